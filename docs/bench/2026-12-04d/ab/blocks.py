import os, sys, runpy, time, numpy as np
res = {}
for B in (10, 20, 50, 100):
    os.environ["BATCH"] = str(B)
    # import the parts script's definitions without its printing: run its top up to the timings
    src = open("docs/bench/2026-12-04b/one_core_parts.py").read()
    src = src.replace("f, B, SIZES = np.float32, 100,", "f, B, SIZES = np.float32, %d," % B)
    head, tail = src.split("alone = {name")
    defs = "\n".join(tail.split("# The weight gradients")[1].split("\n")[2:])
    defs = defs.split('print("a step')[0]
    ns = {}
    exec(head + defs, ns)
    n = 3000 if B < 50 else 1000
    for rnd in range(5):
        for blocks in (1, 2, 4, 8, 16):
            us = ns["timed"](ns["step_with"](ns["first_in_blocks"](blocks)), n)
            res.setdefault((B, blocks), []).append(us)
    print(B, " ".join("%d:%.1f" % (bl, np.median(res[(B, bl)])) for bl in (1, 2, 4, 8, 16)), flush=True)
