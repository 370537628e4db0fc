#!/usr/bin/env bash
# The wide network's scaling row as users run it (the 16:15 run's two-core child gave OpenBLAS
# two threads): `xpmlp bench --threads 1,2`, whose two-core child has everyone's defaults
# (ours: the compiled step on two threads, BLAS on one; JAX its own).
set -u
cd "$(dirname "$0")"
PY=${PY:-python3}
echo "== wide default start $(date -u +%FT%TZ)" >> conditions.txt; uptime >> conditions.txt
echo "$ xpmlp bench --no-torch --json --hidden 2048,1024 --activation relu --loss sce --epochs 1 --threads 1,2" >> conditions.txt
"$PY" -m xpmlp bench --no-torch --json --hidden 2048,1024 --activation relu --loss sce --epochs 1 --threads 1,2 \
  > "wide_default_threads1,2${SUFFIX:-}.json" 2> "wide_default_threads1,2${SUFFIX:-}.log"
echo "== wide default end $(date -u +%FT%TZ)" >> conditions.txt; uptime >> conditions.txt
