"""The command line: parses, checks and reports.  Training logic lives in train.py."""
import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from . import rundir
from .config import DATASETS, TRAJECTORY_KEYS, TrainConfig, TrainError
from .core.model import ACTIVATIONS, DTYPES, LOSSES, MODELS

DEFAULTS = TrainConfig()


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-inf" or "-1e-3" for a flag, not a value: --momentum -inf would
        # complain that it expects an argument instead of saying the value is not finite.
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message):  # one line, not usage + traceback
        raise UserError(message)


def _number(cast, *, positive=False, nonnegative=False):
    """An argparse type: ``cast`` (int or float) of the text, finite, and > 0 when ``positive``,
    >= 0 when ``nonnegative``."""
    kind = "integer" if cast is int else "number"

    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind}: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite: {text!r}")
        if positive and not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive {kind}, got {value}")
        if nonnegative and not value >= 0:
            raise argparse.ArgumentTypeError(f"must be a non-negative {kind}, got {value}")
        return value

    return parse


_finite_float, _positive_int = _number(float), _number(int, positive=True)
_nonnegative_int = _number(int, nonnegative=True)


def _val(text):
    """--val: a whole number of samples, or a fraction in (0, 1)."""
    try:
        value = int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of samples or a fraction like 0.1: {text!r}") from None
    if isinstance(value, float) and not 0 < value < 1 or isinstance(value, int) and value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of samples (1 or more) or a fraction in (0, 1): {text!r}")
    return value


def _hidden(text):
    try:
        return [int(h) for h in text.split(",") if h.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 256,128: {text!r}") from None


def _thread_counts(text):
    """'2' or '1,2,4': positive thread counts, each once, in the order given."""
    counts = [_positive_int(part) for part in text.split(",")]
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"each thread count once: {text!r}")
    return counts


MAX_SEEDS = 64  # one stacked group: K models' weights, velocities and activations in memory


def _seed_list(text):
    """'0-4' or '0,3,7' (or both: '0-2,9'): distinct non-negative seeds, at most MAX_SEEDS."""
    seeds = []
    for item in text.split(","):
        first, dash, last = item.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seeds like 0-4 or 0,3,7: {text!r}") from None
        if low < 0 or high < low:
            raise argparse.ArgumentTypeError(f"expected seeds like 0-4 or 0,3,7 (non-negative, low-high): {text!r}")
        if high - low >= MAX_SEEDS:
            raise argparse.ArgumentTypeError(f"at most {MAX_SEEDS} seeds in one run: {text!r}")
        seeds += range(low, high + 1)
    duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicates:
        raise argparse.ArgumentTypeError(f"seed {duplicates[0]} given twice in {text!r}")
    if len(seeds) > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SEEDS} seeds in one run, got {len(seeds)}")
    return seeds


def add_train_flags(p):
    d = DEFAULTS
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"one of the report's networks (default: {d.model})")
    g.add_argument("--hidden", type=_hidden, help="custom MLP: hidden sizes, e.g. 256,128 (with --activation, --loss)")
    g.add_argument("--activation", choices=list(ACTIVATIONS), help="custom MLP activation")
    g.add_argument("--loss", choices=list(LOSSES), help="custom MLP loss")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"(default: {d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"(default: {d.batch_size})")
    g.add_argument("--lr", type=_finite_float, help=f"learning rate (default: {d.lr})")
    g.add_argument("--lr-schedule", metavar="SCHEDULE",
                   help="step:EPOCHS:FACTOR (lr times FACTOR every EPOCHS epochs) or cosine (annealed to 0 over "
                        "--epochs); each epoch's rate is in its record (default: constant lr)")
    g.add_argument("--momentum", type=_finite_float, help=f"in [0, 1] (default: {d.momentum})")
    g.add_argument("--weight-decay", type=_finite_float, help=f"(default: {d.weight_decay})")
    g.add_argument("--init-std", type=_finite_float, help=f"std of the initial weights (default: {d.init_std})")
    g.add_argument("--seed", type=int, help=f"weights and shuffling (default: {d.seed})")
    g.add_argument("--val", type=_val, metavar="N|FRACTION",
                   help="hold N training samples (or a fraction, e.g. 0.1) out as a validation set, the same "
                        "seeded choice for every run on the same data; its metrics in the records and best.npz, "
                        "the checkpoint of the best validation accuracy (default: none)")
    g.add_argument("--seeds", type=_seed_list, metavar="LIST",
                   help="train one model per seed as one stacked program, e.g. 0-4 or 0,3,7: a run "
                        "directory per seed under --out, and their mean/std/min/max in --out/summary.json")
    g.add_argument("--dtype", choices=DTYPES, help=f"(default: {d.dtype})")
    g = p.add_argument_group("run")
    g.add_argument("--device", help=f"auto, cpu, numpy, cuda, cuda:N, torch[:cpu|:cuda|:cuda:N|:mps] (default: {d.device})")
    g.add_argument("--data-dir", help="directory of the --dataset's files (default for MNIST: $XPMLP_DATA_DIR; "
                                      "else a per-user cache; downloaded if absent)")
    g.add_argument("--dataset", choices=DATASETS,
                   help=f"a dataset known by name, downloaded and verified against its published sums "
                        f"(default: {d.dataset})")
    g.add_argument("--data", metavar="DIR_OR_FILE",
                   help="your own data: a directory of IDX files (train/t10k images and labels, gzipped or not) or "
                        "an .npz with x_train, y_train, x_test, y_test; see docs/own-data.md")
    g.add_argument("--out", help="run directory (default: runs/<model>-<timestamp>)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint; "
                                                       "a larger --epochs extends a finished run")
    g.add_argument("--eval-every", type=int, help=f"test-set evaluation period in epochs (default: {d.eval_every})")
    g.add_argument("--checkpoint-every", type=int, help=f"in epochs (default: {d.checkpoint_every})")
    g.add_argument("--log-every", type=int, help=f"iterations between logged records (default: {d.log_every})")
    g.add_argument("--tensorboard", action="store_true", default=None, help="write TensorBoard event files")
    g.add_argument("--quiet", action="store_true", help="no progress bar: one line per epoch")


def config_from_args(args):
    """The TrainConfig for a new run, or for a resumed one (its saved settings plus the
    flags given now, which may change epochs and run settings but not the trajectory)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if given.get("hidden") is not None and "model" in given:
        raise UserError("give either --model or --hidden/--activation/--loss, not both")
    if "hidden" in given and ("loss" not in given or (given["hidden"] and "activation" not in given)):
        raise UserError("--hidden needs --loss, and --activation when there are hidden layers")
    if "data" in given and ("dataset" in given or "data_dir" in given):
        raise UserError("give either --data (your own) or --dataset/--data-dir (one known by name), not both")
    if "dataset" in given:  # on a resume, a named dataset replaces the run's own data
        given["data"] = None
    if not args.resume:
        return TrainConfig(**given).validate()
    run_dir = Path(args.resume)
    holder = rundir.lock_holder(run_dir)
    if holder is not None:  # say so even before its config.json exists
        raise rundir.RunDirBusy.of(run_dir, holder)
    if not (run_dir / rundir.CONFIG).is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no {rundir.CONFIG})")
    if rundir.read_summary(run_dir).get("status") == "diverged":
        raise UserError(f"--resume {run_dir}: the run diverged (non-finite loss); its weights are not worth continuing")
    config, saved = rundir.load_config(run_dir)
    if "epochs" in given:  # a user meaning "two more" must not silently get a shorter run
        state = rundir.checkpoint_state(run_dir / rundir.CHECKPOINT) or {}
        done, pos = state.get("epoch", 0), state.get("pos", 0)
        if given["epochs"] < done + (1 if pos else 0):
            so_far = f"{done} epochs" + (f" and {pos} iterations" if pos else "")
            raise UserError(f"--resume {run_dir}: --epochs {given['epochs']} is fewer than the run has done "
                            f"({so_far}); --epochs is the total, not how many more: give --epochs "
                            f"{done + 1} or more to extend it")
    if config.hidden is None and config.model not in MODELS:
        raise UserError(f"--resume {run_dir}: unknown model {config.model!r} in config.json")
    if config.lr_schedule == "cosine" and given.get("epochs", config.epochs) != config.epochs:
        raise UserError(f"--resume {run_dir}: its cosine schedule anneals over its {config.epochs} epochs; "
                        "a run of another length is another schedule: start one")
    for key, value in given.items():
        old = getattr(config, key)
        if key in TRAJECTORY_KEYS and key != "model" and value != old:
            raise UserError(f"--resume {run_dir}: --{key.replace('_', '-')} {value} contradicts the run's {old}")
        if key == "model" and value != saved["model"]:
            raise UserError(f"--resume {run_dir}: --model {value} contradicts the run's {saved['model']}")
        setattr(config, key, value)
    return config.validate()


def _prepare_out(args, config):
    """The run directory, and whether this call created it."""
    if args.resume:
        return Path(args.resume), False
    out = Path(args.out) if args.out else Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    holder = rundir.lock_holder(out)
    if holder is not None:
        raise rundir.RunDirBusy.of(out, holder)
    if (out / rundir.CHECKPOINT).exists() or (out / rundir.GROUP_CHECKPOINT).exists():
        raise UserError(f"--out {out} already holds a run; resume it with --resume {out} or choose another --out")
    created = not out.exists()
    return _writable_dir(out, "--out"), created


def _writable_dir(path, flag):
    """``path``, created if need be, once a file could be written there; else a UserError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def _run_dir(text):
    run_dir = Path(text)
    if not rundir.is_run(run_dir):
        raise UserError(f"{run_dir}: holds no run (needs {rundir.CONFIG} and {rundir.CHECKPOINT})")
    return run_dir


def cmd_train(args):
    from .processes import die_with_parent
    from .training.launch import train
    from .training.train import Trainer

    die_with_parent()  # a sweep's run ends with its sweep
    if args.seeds is not None or (args.resume and (Path(args.resume) / rundir.GROUP_FILE).is_file()):
        return train_seeds(args)
    if args.resume and not (Path(args.resume) / rundir.CHECKPOINT).exists():
        _refuse_a_group_member(Path(args.resume))
    config = config_from_args(args)
    run, (config,) = _run_setup(args, [config])
    threads, progress, log, notices, backend, data = run
    if args.resume:
        rundir.check_data(args.resume, rundir.load_config(args.resume)[1], data.info)
    out, created = _prepare_out(args, config)
    try:
        train(lambda resume: Trainer(config, out, data, resume=resume, progress=progress, log=log,
                                     backend=backend),
              [out], out / rundir.CHECKPOINT, threads=threads, log=log, notices=notices,
              announce=lambda t: f"training {config.name} on {backend.device} ({config.dtype}) into {out}")
        summary = rundir.read_json(out / rundir.SUMMARY)
    except (UserError, TrainError):
        if created and not any((out / name).exists() for name in rundir.RESULT_FILES):
            shutil.rmtree(out, ignore_errors=True)  # nothing that looks like a run: leave no directory
        raise
    log(f"{summary['status']}: test accuracy {_pct(summary['test_acc'])}, "
        f"train time {summary['train_time_s']:.1f}s -> {out}/summary.json")
    return {"completed": 0, "diverged": 0}.get(summary["status"], 130)


def _run_setup(args, configs):
    """What a training command needs before any file is written, every mistake found first:
    ((threads, progress, log, notices, backend, data), the configs fitted to the data).
    ``notices``: lines shown once the run starts, so that a mistake found first stays one line."""
    from .backends import get_backend
    from .data import training_data
    from .training.threads import blas_threads

    threads = blas_threads()  # a bad $XPMLP_THREADS fails here
    progress = not args.quiet and sys.stderr.isatty()
    notices = []
    backend = get_backend(configs[0].device, notice=notices.append)
    backend.dtype(configs[0].dtype)  # one the device lacks (float64 on MPS) too
    data = training_data(configs[0], progress=progress)
    return (threads, progress, _log_fn(progress), notices, backend, data), [c.fit_data(data) for c in configs]


def _refuse_a_group_member(run_dir):
    """A stacked group's member has no checkpoint of its own: resumed alone it would be
    cleared and trained again, losing the group's progress.  Say how to resume it instead."""
    from .training.stack import group_of
    group = group_of(run_dir)
    if group is None:
        return
    how = ("run the same `xpmlp sweep ... --stack` again" if group.parent.name == ".stacks"
           else f"xpmlp train --resume {os.path.relpath(group)}")
    raise UserError(f"--resume {run_dir}: this run trains in the stacked group {os.path.relpath(group)}, "
                    f"whose checkpoint it shares; resume the group: {how}")


def train_seeds(args):
    """``train --seeds LIST``: one stacked group, a run directory per seed under --out and an
    aggregate summary.json; ``train --resume OUT`` of such a directory continues the group."""
    from .training.launch import train
    from .training.stack import StackTrainer, aggregate, group_configs

    created = False
    if args.resume:
        out = Path(args.resume)
        holder = rundir.lock_holder(out)
        if holder is not None:
            raise rundir.RunDirBusy.of(out, holder)
        if args.seeds is not None or any(getattr(args, k) is not None for k in TRAJECTORY_KEYS):
            raise UserError(f"--resume {out}: a seeds group resumes with the settings it was started with")
        configs, run_dirs = group_configs(out)
        if args.epochs is not None and args.epochs != configs[0].epochs:
            raise UserError(f"--resume {out}: --epochs {args.epochs} contradicts the group's {configs[0].epochs}")
    else:
        if args.seed is not None:
            raise UserError("give either --seed or --seeds, not both")
        config = config_from_args(args)
        configs = [dataclasses.replace(config, seed=s) for s in args.seeds]
    run, configs = _run_setup(args, configs)
    threads, progress, log, notices, backend, data = run
    if args.resume:
        rundir.check_data(out, rundir.read_json(run_dirs[0] / rundir.CONFIG), data.info)
    else:
        out, created = _prepare_out(args, configs[0])
        run_dirs = [out / f"seed={c.seed}" for c in configs]
    seeds = ", ".join(str(c.seed) for c in configs)
    try:
        trainer = train(lambda resume: StackTrainer(configs, run_dirs, data, out, resume=resume, progress=progress,
                                                    log=log, backend=backend),
                        [out, *run_dirs], out / rundir.GROUP_CHECKPOINT, threads=threads, log=log, notices=notices,
                        kind="group checkpoint",
                        announce=lambda t: f"training {configs[0].name} with seeds {seeds} as one stacked program "
                                           f"on {backend.device} ({configs[0].dtype}) into {out}")
        summaries = [rundir.read_json(d / rundir.SUMMARY) for d in run_dirs]
        aggregated = aggregate(summaries)
        rundir.write_json(out / rundir.SUMMARY, {
            # relative to this summary, as stack.json names them: readable from anywhere
            "runs": [os.path.relpath(d, out) for d in run_dirs], "seeds": [c.seed for c in configs],
            "status": [s["status"] for s in summaries], **aggregated})
    except (UserError, TrainError):
        if created and not (out / rundir.GROUP_FILE).exists():
            shutil.rmtree(out, ignore_errors=True)  # nothing that looks like a result: leave no directory
        raise
    accs = aggregated.get("test_acc")
    log(f"{len(configs)} seeds: " + ", ".join(f"{s['status']}" for s in summaries)
        + (f"; test accuracy mean {_pct(accs['mean'])}, std {100 * accs['std']:.2f} points" if accs else "")
        + f" -> {out}/summary.json")
    if trainer.state["status"] == "interrupted":
        _say(f"xpmlp: interrupted; continue the group with: {rundir.resume_command(out)}")
    return 0 if all(s["status"] in ("completed", "diverged") for s in summaries) else 130


def cmd_eval(args):
    from .backends import get_backend
    from .training.train import evaluate

    run_dir = _run_dir(args.run_dir)
    config, saved = rundir.load_config(run_dir)
    if args.plots is not None and config.in_features != 784:
        raise UserError(f"--plots draws 28x28 images; {run_dir} has {config.in_features} features per sample")
    plots_dir = None if args.plots is None else _writable_dir(args.plots or run_dir, "--plots")
    data = _run_data(args, config)
    rundir.check_data(run_dir, saved, data.info)
    notices = []  # shown with the result, so that an error stays one line
    backend = get_backend(args.device or config.device, notice=notices.append)
    model, state = rundir.load_model(run_dir, backend, config, args.checkpoint)
    x_test = backend.asarray(data.test_x, dtype=model.dtype)
    loss, acc = evaluate(model, x_test, backend.asarray(data.test_y))
    # A checkpoint taken inside an epoch (Ctrl-C) holds the weights `pos` steps past the last epoch's end.
    pos = state.get("pos", 0)
    result = {"run": str(run_dir), "checkpoint": args.checkpoint, "epoch": state["epoch"], "iter": state["iter"] + pos,
              "iters_into_next_epoch": pos, "test_loss": loss, "test_acc": acc}
    lines = []
    if plots_dir is not None:
        from .inspect import Predictions
        from .plots import write_eval_plots
        predictions = Predictions(model, x_test, data.test_y)
        paths = write_eval_plots(model, predictions, data.test_x, plots_dir, name=config.name)
        result.update(per_class=predictions.per_class(), confusion_matrix=predictions.confusion.tolist(),
                      plots=[str(p) for p in paths])
        lines = _per_class_lines(result["per_class"]) + [f"wrote {p}" for p in paths]
    for line in notices:
        print(line, file=sys.stderr)
    where = ("best: " if args.checkpoint == "best" else "") + f"epoch {result['epoch']}" + \
        (f" + {pos} iterations" if pos else "")
    print(json.dumps(result) if args.json else
          "\n".join([f"{run_dir}: {where}  test loss {loss:.4f}  test accuracy {_pct(acc)}", *lines]))
    return 0


def _run_data(args, config):
    """The data to evaluate a run on: what the flags say, else the run's own."""
    from .data import load_data

    if args.data and (args.dataset or args.data_dir):
        raise UserError("give either --data (your own) or --dataset/--data-dir (one known by name), not both")
    if args.data or (config.data and not args.dataset):
        return load_data(args.data or config.data)
    dataset = args.dataset or config.dataset
    data_dir = args.data_dir or (_run_data_dir(config) if dataset == config.dataset else None)
    return load_data(None, dataset, data_dir, progress=sys.stderr.isatty())


def _run_data_dir(config):
    """The data_dir of a run's config.json, for eval, if nothing here says where MNIST is
    ($XPMLP_DATA_DIR wins) and it holds MNIST already: a run may come from another machine,
    and its path is never created or downloaded into (None: the usual places)."""
    from .data import DataError, mnist_files

    if (os.environ.get("XPMLP_DATA_DIR") and config.dataset == "mnist") or not config.data_dir:
        return None
    try:
        mnist_files(config.data_dir, download=False, progress=False, dataset=config.dataset)
    except DataError:
        return None
    return config.data_dir


def _per_class_lines(per_class):
    lines = ["digit  precision  recall  images"]
    for digit, (p, r, n) in enumerate(zip(per_class["precision"], per_class["recall"], per_class["count"])):
        lines.append(f"{digit:>5}  {_pct(p):>9}  {_pct(r):>6}  {n:>6}")
    if None in per_class["precision"] or None in per_class["recall"]:
        lines.append("(n/a: a digit the model never predicted has no precision; one with no images, no recall)")
    return lines


def cmd_predict(args):
    import numpy as np

    from .data import to_inputs
    from .digits import read_digit
    from .inspect import class_probabilities, load_model

    run_dir = _run_dir(args.run_dir)
    show_dir = None if args.show is None else _writable_dir(args.show, "--show")
    # Every file is checked before any output, one at a time: only its 28x28 digit is kept
    # (and for --show a small copy of the image), not the decoded image.
    read = [_kept(*read_digit(path), show_dir is not None) for path in args.images]
    notices = []
    model = load_model(run_dir, args.device, notice=notices.append, checkpoint=args.checkpoint)
    x = model.backend.asarray(to_inputs(np.stack([digit for _, digit in read])), dtype=model.dtype)
    probabilities = class_probabilities(model, x)
    results, shown = [], set()
    for path, (gray, digit), probs in zip(args.images, read, probabilities):
        top = np.argsort(-probs, kind="stable")[:3]
        results.append({"file": str(path), "digit": int(top[0]),
                        "top3": [{"digit": int(d), "probability": float(probs[d])} for d in top],
                        "probabilities": probs.tolist()})
        if show_dir is not None:
            from .plots import save_png, seen_figure
            name = f"{Path(path).stem}.seen.png"
            if name in shown:  # two inputs of the same name from different directories
                name = f"{Path(path).stem}-{len(results)}.seen.png"
            shown.add(name)
            title = f"{Path(path).name}: {top[0]} ({100 * probs[top[0]]:.1f}%)"
            results[-1]["shown"] = str(save_png(seen_figure(gray, digit, title), show_dir / name))
    for line in notices:
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps({"run": str(run_dir), "predictions": results}))
        return 0
    for r in results:
        ranked = ", ".join(f"{t['digit']}: {_pct(t['probability'])}" for t in r["top3"])
        print(f"{r['file']}: {r['digit']}  ({ranked})" + (f"  -> {r['shown']}" if "shown" in r else ""))
    return 0


def _kept(gray, digit, show):
    """What predict keeps of a file read: the digit, and for --show the image at most
    SHOW_SIDE pixels on its longer side (every k-th pixel: it is a picture's thumbnail)."""
    step = -(-max(gray.shape) // SHOW_SIDE)
    return (gray[::step, ::step].copy() if show else None), digit


SHOW_SIDE = 512


def cmd_data(args):
    from .data import KNOWN, load_verified, mnist_files

    paths = mnist_files(args.dir, progress=sys.stderr.isatty(), dataset=args.dataset)
    arrays = load_verified(paths, args.dataset)
    folders = sorted({str(p.parent) for p in paths.values()})
    known = KNOWN[args.dataset]
    print(f"{known.title} is in {', '.join(folders)} (4 files, {known.check} verified):")
    for key, path in paths.items():
        print(f"  {path.name}  {' x '.join(map(str, arrays[key].shape))}")
    return 0


def cmd_export(args):
    from .saved import export

    run_dir = _run_dir(args.run_dir)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise UserError(f"export: {out} should end in .npz (numpy.savez adds it otherwise)")
    _writable_dir(out.parent, "export")
    shapes = export(run_dir, out)
    print(f"wrote {out}: " + ", ".join(f"{k} {'x'.join(map(str, s)) or 'scalar'}" for k, s in shapes.items()))
    return 0


def cmd_sweep(args):
    from .sweep import LocalExecutor, RayExecutor, run_sweep  # neither imports Ray
    ray_flags = {k: v for k, v in dict(address=args.address, cpus_per_run=args.cpus_per_run,
                                       gpus_per_run=args.gpus_per_run,
                                       shared_fs=False if args.no_shared_fs else None).items() if v is not None}
    if args.executor == "ray":
        if args.jobs is not None:
            raise UserError("--jobs is for the local executor; with --executor ray, --cpus-per-run and "
                            "--gpus-per-run say how many runs fit on each machine")
        executor = RayExecutor(**ray_flags)
    elif ray_flags:
        raise UserError("--address, --cpus-per-run, --gpus-per-run and --no-shared-fs need --executor ray")
    else:
        executor = LocalExecutor(1 if args.jobs is None else args.jobs)
    return run_sweep(args.configs, executor=executor, device=args.device, out=args.out, data_dir=args.data_dir,
                     epochs=args.epochs, dry_run=args.dry_run, stack=args.stack, max_stack=args.max_stack)


def cmd_report(args):
    from .report import export_records, load_reference, make_report
    run_dirs = list(args.run_dirs)
    for root in args.runs_under or []:
        run_dirs += sorted(str(p.parent) for p in Path(root).glob(f"**/{rundir.CONFIG}"))
    if not run_dirs:
        raise UserError("report: no run directories given (RUN_DIRS... or --runs-under DIR)")
    if args.published is None:
        return _own_report(run_dirs, args)
    if args.out is None:
        raise UserError("report: --published needs --out DIR for its tables and figures")
    if not Path(args.published).is_file():
        raise UserError(f"report: no reference tables at {args.published} "
                        "(the report's are experiments/published.toml in the source tree)")
    load_reference(args.published)  # a damaged one is refused before anything is written
    _writable_dir(args.out, "--out")
    if args.copy_runs:   # the tables and figures are then drawn from the records alone, so
        # `make report` rebuilds them from what is kept, byte for byte (the tables)
        run_dirs = export_records(run_dirs, args.out)
        print(f"wrote the records of {len(run_dirs)} runs to {Path(args.out) / 'runs'}")
    for path in make_report(run_dirs, args.out, args.published, ignore=tuple(args.ignore or ())):
        print(path)
    return 0


def _own_report(run_dirs, args):
    """A table of any runs, printed, and written to OUT/runs.md with --out."""
    from .report import load_runs, runs_table

    if args.copy_runs or args.ignore:
        raise UserError("report: --copy-runs and --ignore go with --published")
    runs = load_runs(run_dirs)
    if not runs:
        raise UserError(f"report: none of the {len(run_dirs)} directories holds a run ({rundir.CONFIG})")
    table = runs_table(runs)
    print(table, end="")
    if args.out:
        path = _writable_dir(args.out, "--out") / "runs.md"
        rundir.atomic_write_bytes(path, f"# Runs\n\n{table}".encode())
        print(path)
    return 0


def cmd_bench(args):
    if args.stack and args.epochs < 3:
        raise UserError(f"--stack reports a median of at least 3 epochs: --epochs {args.epochs} is too few")
    if args.hidden is not None and args.model is not None:
        raise UserError("give either --model or --hidden/--activation/--loss, not both")
    if args.hidden is not None and (args.loss is None or (args.hidden and args.activation is None)):
        raise UserError("--hidden needs --loss, and --activation when there are hidden layers")
    if (args.activation or args.loss) and args.hidden is None:
        raise UserError("--activation and --loss go with --hidden (or name a network with --model)")
    if args.stack and (args.model or args.hidden is not None or args.batch_size or len(args.threads or ()) > 1):
        raise UserError("--stack times mlp2-relu-sce, batch 100, at one thread count")
    if len(args.threads or ()) > 1 and (args.pin or args.busy):
        raise UserError("a scaling table (--threads with several counts) sets each row's cores itself: "
                        "no --pin or --busy with it")
    if args.no_kernels:  # the buffered ops need out= buffers: say so before anything runs
        from .backends import get_backend
        backend = get_backend(args.device)
        if not backend.has_out_buffers:
            raise UserError(f"--no-kernels times the buffered ops, which {backend.name} does not have "
                            "(it runs the plain ops only)")
    from .bench import main as bench_main
    return bench_main(args)


def _pct(value):
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _log_fn(progress):
    """Where a run's lines go: above the progress bar, or stdout.  A reader that went away
    (``| head``, or a ``| tee`` ended by the same Ctrl-C) must not stop the run."""
    if progress:
        from tqdm import tqdm
        write = tqdm.write
    else:
        def write(line):
            print(line, flush=True)

    def log(line):
        try:
            write(line)
        except BrokenPipeError:
            _drop_closed_pipes()

    return log


def _say(line):
    """A line on stderr, for the user rather than the record."""
    try:
        print(line, file=sys.stderr)
    except BrokenPipeError:
        _drop_closed_pipes()


def _drop_closed_pipes():
    """Point stdout and stderr at the null device once their reader has gone, so that no later
    line, and no flush at exit, raises BrokenPipeError."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass
        try:
            os.dup2(null, stream.fileno())
        except (OSError, ValueError):  # not a real file (a test's capture)
            pass
    os.close(null)


def build_parser():
    parser = _Parser(prog="xpmlp", description="Hand-written MLPs on MNIST, on NumPy (CPU) or CuPy (GPU).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one network on MNIST (or --dataset, or your own --data)",
                       description="Train one network on MNIST, a dataset known by name (--dataset) or your own "
                                   "(--data) into a run directory.")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test metrics of a run's last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--device", help="default: the run's device")
    p.add_argument("--data-dir")
    p.add_argument("--dataset", choices=DATASETS, help="default: the run's")
    p.add_argument("--data", metavar="DIR_OR_FILE", help="your own data (default: the run's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--checkpoint", choices=list(rundir.CHECKPOINTS), default="last",
                   help="last (default), or best: the epoch of the best validation accuracy (runs trained with --val)")
    p.add_argument("--plots", nargs="?", const="", metavar="DIR",
                   help="also write a confusion matrix, the most confident mistakes and the first layer's "
                        "weights as PNGs into DIR (default: the run directory), and print per-class "
                        "precision and recall")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="read digits from image files with a trained network",
                       description="Read PNG or JPEG digits of any size, made into 28x28 MNIST-style "
                                   "digits, with a run's last checkpoint.")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--device", default="cpu", help="default: cpu (a few images need no GPU)")
    p.add_argument("--checkpoint", choices=list(rundir.CHECKPOINTS), default="last",
                   help="last (default), or best: the epoch of the best validation accuracy (runs trained with --val)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--show", nargs="?", const=".", metavar="DIR",
                   help="write IMAGE's stem + .seen.png into DIR (default: .): the file beside the "
                        "28x28 digit the network saw")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("data", help="find or download MNIST (or --dataset), verify it and say where it is")
    p.add_argument("--dir", "--data-dir", dest="dir",
                   help="its directory (default for MNIST: $XPMLP_DATA_DIR; else a per-user cache)")
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="default: mnist")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("export", help="write a run's weights and biases to an .npz NumPy alone can read",
                       description="Write RUN's last checkpoint as W0, b0, W1, b1, ... (a layer is x @ W + b), "
                                   "activation, output, input_scaling and classes: see docs/own-data.md.")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("out", metavar="OUT.npz")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="run a grid of trainings from TOML configs, restartably")
    p.add_argument("configs", nargs="+", help="TOML sweep configs (see experiments/)")
    p.add_argument("--jobs", type=int, help="local executor: runs at a time (default: 1)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: processes on this machine (default); ray: each run (or stacked group) a Ray "
                        "task, on a local Ray instance or the cluster at --address (pip install 'xpmlp[ray]')")
    p.add_argument("--device", help="override the configs' device")
    p.add_argument("--out", help="override the configs' output root")
    p.add_argument("--data-dir")
    p.add_argument("--epochs", type=int, help="override epochs (for a quick trial)")
    p.add_argument("--dry-run", action="store_true", help="list the grid and what would run")
    p.add_argument("--stack", action="store_true",
                   help="train the points that share architecture, batch size, dtype, epochs and device "
                        "as stacked groups, one program each, in this process")
    p.add_argument("--max-stack", type=_positive_int, metavar="K", help="at most K models in a group (memory)")
    g = p.add_argument_group("Ray (--executor ray)")
    g.add_argument("--address", help="join a running Ray cluster: auto (the one this machine belongs to) or "
                                     "HOST:PORT of its head (default: start a local Ray instance)")
    g.add_argument("--cpus-per-run", type=_finite_float, metavar="N", help="CPUs Ray reserves for each run; its "
                   "threads, by xpmlp's policy, fit in them (default: 1)")
    g.add_argument("--gpus-per-run", type=_finite_float, metavar="N",
                   help="GPUs per run, fractions allowed (0.25: four runs share a GPU); each run trains with "
                        "--device cuda on the GPU Ray gives it (default: 0)")
    g.add_argument("--no-shared-fs", action="store_true", default=None,
                   help="the workers do not see this machine's files: each run (or stacked group) trains in a "
                        "temporary directory on its worker and sends its files back here at every checkpoint")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="tables and figures from run directories",
                       description="Without --published: one table of the runs (the settings that differ, final "
                                   "and best metrics, time), printed and, with --out, written to OUT/runs.md.  With "
                                   "--published: the runs matched to reference tables, with figures, into --out.")
    p.add_argument("run_dirs", nargs="*")
    p.add_argument("--runs-under", action="append", metavar="DIR", help="use every run below DIR")
    p.add_argument("--out", help="directory to write into (needed with --published)")
    p.add_argument("--published", metavar="TOML",
                   help="the reference tables, e.g. the report's experiments/published.toml")
    p.add_argument("--copy-runs", action="store_true",
                   help="also write each run's record (config, summary, epoch records, compact "
                        "iteration curve) to OUT/runs/")
    p.add_argument("--ignore", action="append", metavar="KEY",
                   help="config key not to match on (e.g. epochs, for short trial runs)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="time training epochs against PyTorch and the GEMM limit")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--epochs", type=_positive_int, default=3, help="timed epochs after one warm-up (default: 3)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--no-kernels", action="store_true",
                   help="time the buffered ops: our fast path without the backend's fused kernels (Numba / CUDA)")
    p.add_argument("--no-jax", action="store_true", help="skip the JAX comparison (run when jax is installed)")
    p.add_argument("--threads", type=_thread_counts,
                   help="CPU threads of every contender (default: ours by xpmlp's policy, 1 unless "
                        "$XPMLP_THREADS says otherwise; PyTorch and JAX their own default); several, "
                        "e.g. 1,2,4: a scaling table, each count on as many cores")
    p.add_argument("--model", help="one of the report's networks (default: mlp2-relu-sce)")
    p.add_argument("--hidden", type=_hidden, help="custom MLP: hidden sizes, e.g. 2048,1024 (with --activation, --loss)")
    p.add_argument("--activation", choices=list(ACTIVATIONS), help="custom MLP activation")
    p.add_argument("--loss", choices=list(LOSSES), help="custom MLP loss")
    p.add_argument("--batch-size", type=_positive_int, help="(default: 100)")
    p.add_argument("--log-every", type=_positive_int, default=1,
                   help="our epoch's iteration records, one every N steps, as train's --log-every (default: 1)")
    p.add_argument("--pin", action="store_true",
                   help="pin every contender to one core (Linux; elsewhere: not pinned), one thread each")
    p.add_argument("--busy", type=_nonnegative_int, default=0, metavar="N",
                   help="also time every contender with N CPU-bound processes running (ratio_busy)")
    p.add_argument("--stack", type=_positive_int, metavar="K",
                   help="time K stacked models against one model at a time instead (model-epochs per second)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    from .backends import BackendUnavailable
    from .data import DataError
    from .digits import ImageError

    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
    except (UserError, TrainError, DataError, BackendUnavailable, ImageError) as exc:
        print(f"xpmlp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xpmlp: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # the reader of our output went away: nothing more to say
        _drop_closed_pipes()
        return 1
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
        # A place the user pointed us at that cannot be written or read as a file (a
        # read-only run directory, a path under a file): theirs to fix, so one line.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"xpmlp: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    if code == 130 and threading.current_thread() is threading.main_thread():
        # The user asked us to stop and we are on our way out: a further Ctrl-C would land in
        # the interpreter's shutdown (thread joins, Numba's and tqdm's finalizers) as an
        # "Exception ignored ... KeyboardInterrupt" traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
