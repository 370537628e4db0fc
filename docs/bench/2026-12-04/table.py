"""The Markdown table of run.sh's JSONs: our epoch and JAX's at one core and at two."""
import json
import pathlib

here = pathlib.Path(__file__).parent
print("| network, batch | ours, 1 core | JAX, 1 core | ratio | ours, 2 cores | JAX, 2 cores | ratio "
      "| ours 2 cores / 1 | records share | step threads, split share | JAX check |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for path in sorted(here.glob("*.json")):
    r = json.loads(path.read_text())
    one, two = r["scaling"]
    ms = lambda v: "n/a" if v is None else f"{v * 1000:.0f} ms"
    ratio = lambda v: "n/a" if v is None else f"{v:.2f}"
    check = two.get("jax_check") or {}
    split = two.get("two_thread_step_share")
    print(f"| {r['model']}, {r['batch_size']} | {ms(one['epoch_s'])} | {ms(one['jax_epoch_s'])} | "
          f"{ratio(one['ratio_jax'])} | {ms(two['epoch_s'])} | {ms(two['jax_epoch_s'])} | {ratio(two['ratio_jax'])} | "
          f"{two['epoch_s'] / one['epoch_s']:.2f} | {one['records_share']:.1%} / {two['records_share']:.1%} | "
          f"{two['step_threads']}, {'n/a' if split is None else f'{split:.0%}'} | "
          f"{check.get('losses_equal')} ({check.get('max_rel_diff', float('nan')):.1e}) |")
