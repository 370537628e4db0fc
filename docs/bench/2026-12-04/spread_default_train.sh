#!/usr/bin/env bash
# Eight identical default runs of mlp2-relu-sce (the issue's "two threads are fragile"):
# each run's epochs 1-5 from its own train_time_s records, and the median of epochs 2-5.
set -u
PY=${PY:-python3}
for i in 1 2 3 4 5 6 7 8; do
  out=$(mktemp -d)
  "$PY" -m xpmlp train --model mlp2-relu-sce --epochs 5 --eval-every 100000 --quiet --out "$out/run" > /dev/null 2>&1
  "$PY" - "$out/run/metrics.jsonl" "$i" <<'PY'
import json, statistics, sys
times = [r["train_time_s"] for r in map(json.loads, open(sys.argv[1])) if r.get("kind") == "epoch"]
epochs = [b - a for a, b in zip([0] + times[:-1], times)]
print(f"run {sys.argv[2]} epochs", " ".join(f"{e:.3f}" for e in epochs), f"median 2-5 {statistics.median(epochs[1:]):.3f}")
PY
  rm -rf "$out"
done
