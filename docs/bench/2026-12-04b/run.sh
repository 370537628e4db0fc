#!/usr/bin/env bash
# Issue 21's table again after the second session's changes (the chooser's probes, a long
# wait's pause, the layers' update order): for each network `xpmlp bench --threads 1,2` (a
# child bench per core count, confined to that many cores, everyone's defaults there; one
# core: one thread each), ours timed as the trainer's epoch with its records against JAX's
# lax.scan epoch, interleaved, medians; then one busy neighbour, twice.  PyTorch left out.
# Usage: run.sh [OUT_DIR]  (default: this script's folder; 2026-12-04c is a second run)
set -u
cd "${1:-$(dirname "$0")}"
PY=${PY:-python3}
conditions() { echo "== $1 $(date -u +%FT%TZ)"; uptime; ps -eo pid,pcpu,etime,args --sort=-pcpu | head -6 | cut -c1-150; }
run() {
  name=$1; shift
  echo "$ xpmlp bench --no-torch --json $*" >> conditions.txt
  "$PY" -m xpmlp bench --no-torch --json "$@" > "$name.json" 2> "$name.log" || echo "$name failed" >> conditions.txt
}
conditions start > conditions.txt
run mlp2-relu-sce_b100 --model mlp2-relu-sce --epochs 3 --threads 1,2
run mlp1-sigmoid-sce_b100 --model mlp1-sigmoid-sce --epochs 3 --threads 1,2
run mlp2-sigmoid-mse_b100 --model mlp2-sigmoid-mse --epochs 3 --threads 1,2
run mlp0-sce_b100 --model mlp0-sce --epochs 3 --threads 1,2
run mlp2-relu-sce_b10 --model mlp2-relu-sce --batch-size 10 --epochs 3 --threads 1,2
run mlp1-relu-mse_b100 --model mlp1-relu-mse --epochs 3 --threads 1,2
run busy1_mlp2-relu-sce_b100_a --model mlp2-relu-sce --epochs 3 --busy 1
run busy1_mlp2-relu-sce_b100_b --model mlp2-relu-sce --epochs 3 --busy 1
conditions "before the wide network" >> conditions.txt
run wide-2048-1024-relu-sce_b100 --hidden 2048,1024 --activation relu --loss sce --epochs 1 --threads 1,2
conditions end >> conditions.txt
