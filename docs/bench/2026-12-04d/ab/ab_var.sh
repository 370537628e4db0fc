#!/bin/bash
# A/B of a compiled.py constant: VAR=VALUES..., xpmlp train's own epoch records (diffs of train_time_s)
cd /work/main
export XPMLP_DATA_DIR=/work/shared/data/mnist; [ "${THREADS:-default}" = default ] || export XPMLP_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
for round in $(seq ${ROUNDS:-3}); do
  for v in $VALUES; do
    out=/tmp/proto/abv_${TAG}_${v}_${round}
    rm -rf $out
    taskset -c ${CORES:-0,1} .venv/bin/python -c "
import sys, xpmlp.training.compiled as c; c.$VAR=$v
from xpmlp.cli import main; sys.exit(main(sys.argv[1:]))" train $ARGS --eval-every 1000000 --quiet --device cpu --out $out >/dev/null 2>&1
    python3 -c "
import json,statistics,sys
eps=[json.loads(l) for l in open('$out/metrics.jsonl') if '\"epoch\"' in l and 'train_time_s' in l]
c=[e['train_time_s'] for e in eps]; t=[b-a for a,b in zip(c,c[1:])]
print('$TAG $VAR=$v round $round', 'median %.3f s' % statistics.median(t), [round(x,3) for x in t], 'loss', eps[-1].get('train_loss'))" 
  done
done
