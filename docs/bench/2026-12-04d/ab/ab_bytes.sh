#!/bin/bash
cd /work/main
export XPMLP_DATA_DIR=/work/shared/data/mnist; [ "${THREADS:-1}" = default ] || export XPMLP_THREADS=${THREADS:-1} OPENBLAS_NUM_THREADS=${THREADS:-1}
MODEL=${MODEL:-mlp2-relu-sce}; BATCH=${BATCH:-10}; EPOCHS=${EPOCHS:-3}; EXTRA=${EXTRA:-}
for round in $(seq ${ROUNDS:-3}); do
  for bb in ${BYTES:-131072 262144 524288 0}; do
    sb=32; [ $bb = 0 ] && { sb=0; bb=262144; }
    out=/tmp/proto/abb_${MODEL}_${BATCH}_${sb}_${bb}_${round}
    rm -rf $out
    taskset -c ${CORES:-1} .venv/bin/python -c "
import sys, xpmlp.training.compiled as c; c.SMALL_BATCH=$sb; c.BLOCK_BYTES=$bb
from xpmlp.cli import main; sys.exit(main(sys.argv[1:]))" train ${EXTRA:---model $MODEL} --batch-size $BATCH --epochs $EPOCHS --eval-every 1000000 --quiet --device cpu --out $out >/dev/null 2>&1
    python3 -c "
import json,statistics,sys
eps=[json.loads(l) for l in open('$out/metrics.jsonl') if '\"epoch\"' in l and 'train_time_s' in l]
c=[e['train_time_s'] for e in eps]; t=[b-a for a,b in zip(c,c[1:])]
print('$MODEL $EXTRA b$BATCH small_batch=$sb bytes=$bb round $round', 'median %.3f s' % statistics.median(t), [round(x,3) for x in t], 'loss', eps[-1].get('train_loss'))"
  done
done
