"""The test-set confusion matrices of the report's ten Table 11 networks (seed 0), one figure.

    python experiments/confusion_table11.py RUNS_ROOT OUT.png    (make reproduce runs it)

It needs the runs' checkpoints (under runs/reproduce, not in the committed records) and
MNIST; the figure is committed with the other results."""
import argparse
import sys
from pathlib import Path

from xpmlp.plots import write_confusion_grid
from xpmlp.report import load_reference, load_runs, match_runs

PUBLISHED = Path(__file__).resolve().parent / "published.toml"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_root", help="where the reproduction's run directories are")
    parser.add_argument("out", help="the PNG to write")
    args = parser.parse_args(argv)
    reference = load_reference(PUBLISHED)
    runs = load_runs(p.parent for p in Path(args.runs_root).glob("*/config.json"))
    rows = match_runs(reference, runs)["table11"]
    missing = [row["label"] for row, run in rows if run is None or not (run.path / "checkpoint.npz").exists()]
    if missing:
        print(f"confusion_table11: no finished run with a checkpoint for {', '.join(missing)}", file=sys.stderr)
        return 2
    write_confusion_grid([run.path for _, run in rows], args.out, titles=[row["label"] for row, _ in rows],
                         title="Table 11: test-set confusion matrices (seed 0)")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
