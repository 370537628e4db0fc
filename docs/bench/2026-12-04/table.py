"""The Markdown table of run.sh's JSONs: our epoch and JAX's at one core and at two."""
import json
import pathlib

here = pathlib.Path(__file__).parent
print("| network, batch | ours, 1 core | JAX, 1 core | ratio | ours, 2 cores | JAX, 2 cores | ratio "
      "| ours 2 cores / 1 | records share | step threads, split share | JAX check |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
after = []
for path in sorted(here.glob("*.json")):
    r = json.loads(path.read_text())
    if "busy" in r:  # a default run timed idle and with busy processes
        busy = r["busy"]
        after.append(f"\n{r['model']}, batch {r['batch_size']}, default threads, {r['busy_processes']} busy process(es): "
              f"ours {busy['ours'] * 1000:.0f} ms, JAX {busy['jax'] * 1000:.0f} ms (ratio {busy['ours'] / busy['jax']:.2f}); "
              f"idle: ours {r['epoch_s'] * 1000:.0f} ms, JAX {r['jax_epoch_s'] * 1000:.0f} ms; "
              f"ratio_busy {r['ratio_busy']:.2f}")
        continue
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
print("\n".join(after))
