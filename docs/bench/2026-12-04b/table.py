"""The Markdown table of run.sh's JSONs (in this folder, or the one named): our epoch and JAX's on one core (one thread each)
and on two (everyone's defaults), and the busy runs' lines."""
import json
import pathlib
import sys

here = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).parent  # or a second run's folder
rows, after = {}, []
for path in sorted(here.glob("*.json")):
    if not path.read_text().strip():  # a run still under way
        continue
    r = json.loads(path.read_text())
    if "scaling" in r:
        rows[(r["model"], r["batch_size"])] = r["scaling"]
    elif "busy" in r:
        b = r["busy"]
        after.append(f"{r['model']}, batch {r['batch_size']}, default threads, {r['busy_processes']} busy process: "
                     f"ours {b['ours'] * 1000:.0f} ms, JAX {b['jax'] * 1000:.0f} ms (ratio {b['ours'] / b['jax']:.2f}); "
                     f"idle rounds: ours {r['epoch_s'] * 1000:.0f} ms, JAX {r['jax_epoch_s'] * 1000:.0f} ms "
                     f"(ratio {r['ratio_jax']:.2f}); ratio_busy {r['ratio_busy']:.2f}; steps split "
                     f"{r['two_thread_step_share']:.0%}")


def ms(v):
    return "n/a" if v is None else f"{v * 1000:.0f} ms"


print("| network, batch | ours, 1 core | JAX, 1 core | ratio | floor, 1 core | ours, 2 cores | JAX, 2 cores | ratio "
      "| ours 2 cores / 1 | steps split | records |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for key, (one, two) in sorted(rows.items()):
    print(f"| {key[0]}, {key[1]} | {ms(one['epoch_s'])} | {ms(one['jax_epoch_s'])} | {one['ratio_jax']:.2f} | "
          f"{ms(one['floor_epoch_s'])} | {ms(two['epoch_s'])} | {ms(two['jax_epoch_s'])} | {two['ratio_jax']:.2f} | "
          f"{two['epoch_s'] / one['epoch_s']:.2f} | {two.get('two_thread_step_share') or 0:.0%} | "
          f"{two['records_share']:.1%} |")
print()
print("\n".join(after))
