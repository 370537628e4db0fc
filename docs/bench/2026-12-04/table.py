"""The Markdown table of run.sh's and run_default2.sh's JSONs: our epoch and JAX's on one
core (one thread each) and on two (everyone's defaults), and the busy run's line."""
import json
import pathlib

here = pathlib.Path(__file__).parent
rows, defaults, after = {}, {}, []
for path in sorted(here.glob("*.json")):
    r = json.loads(path.read_text())
    key = (r["model"], r["batch_size"])
    if "scaling" in r:
        rows[key] = r["scaling"]
    elif "busy" in r:
        b = r["busy"]
        after.append(f"{r['model']}, batch {r['batch_size']}, default threads, {r['busy_processes']} busy process: "
                     f"ours {b['ours'] * 1000:.0f} ms, JAX {b['jax'] * 1000:.0f} ms (ratio {b['ours'] / b['jax']:.2f}); "
                     f"idle rounds: ours {r['epoch_s'] * 1000:.0f} ms, JAX {r['jax_epoch_s'] * 1000:.0f} ms "
                     f"(ratio {r['ratio_jax']:.2f}); ratio_busy {r['ratio_busy']:.2f}; steps split "
                     f"{r['two_thread_step_share']:.0%}")
    else:
        defaults[key] = r


def ms(v):
    return "n/a" if v is None else f"{v * 1000:.0f} ms"


print("| network, batch | ours, 1 core | JAX, 1 core | ratio | ours, 2 cores | JAX, 2 cores | ratio "
      "| ours 2 cores / 1 | steps split | records | (2 cores, BLAS 2 threads: ours) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for key, (one, two) in sorted(rows.items()):
    d = defaults.get(key)
    two_cols = (f"{ms(d['epoch_s'])} | {ms(d['jax_epoch_s'])} | {d['ratio_jax']:.2f} | "
                f"{d['epoch_s'] / one['epoch_s']:.2f} | {d.get('two_thread_step_share', 0):.0%} | "
                f"{d['records_share']:.1%}") if d else "n/a | n/a | n/a | n/a | n/a | n/a"
    print(f"| {key[0]}, {key[1]} | {ms(one['epoch_s'])} | {ms(one['jax_epoch_s'])} | {one['ratio_jax']:.2f} | "
          f"{two_cols} | {ms(two['epoch_s'])} |")
print()
print("\n".join(after))
