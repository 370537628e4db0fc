#!/usr/bin/env bash
# The two-core rows again, as users run them (16:15's run.sh gave its two-core children
# --threads 2, which also gives OpenBLAS two threads): `xpmlp bench` with its defaults on
# both cores (ours: the compiled step on two threads, BLAS on one; JAX its own).
set -u
cd "$(dirname "$0")"
PY=${PY:-python3}
echo "== default2 start $(date -u +%FT%TZ)" >> conditions.txt; uptime >> conditions.txt
for spec in "mlp2-relu-sce 100" "mlp1-sigmoid-sce 100" "mlp2-sigmoid-mse 100" "mlp0-sce 100" "mlp2-relu-sce 10" "mlp1-relu-mse 100"; do
  set -- $spec
  echo "$ xpmlp bench --no-torch --json --model $1 --batch-size $2 --epochs 3" >> conditions.txt
  "$PY" -m xpmlp bench --no-torch --json --model "$1" --batch-size "$2" --epochs 3 > "default2_$1_b$2.json" 2> "default2_$1_b$2.log"
done
echo "== default2 end $(date -u +%FT%TZ)" >> conditions.txt; uptime >> conditions.txt
