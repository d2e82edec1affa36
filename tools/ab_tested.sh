#!/usr/bin/env bash
# A/B on the device (tool `device`): ab-quick of tools/device_gpu_run.sh (this tree built as the base, each
# AB_TREES build alternating with it for AB_ROUNDS rounds, --only-ours on ROWS), then the quick GPU decode
# suite on each AB_TREES build, since ab-quick only times them. Usage:
#   AB_TREES="name=-DFLAG=1 ..." [ROWS="b,s_q,h_q,s_k,varlen;..."] [AB_ROUNDS=2] bash tools/ab_tested.sh
set -uo pipefail
REPO=$(pwd)
R=${ROWS:-"128,1,128,8192,0;128,2,128,8192,0;128,1,128,8192,1;128,2,64,4096,0"}
TREES=${AB_TREES:?set AB_TREES}
AB_TREES=$TREES AB_BENCH="--only-ours --rows $R" AB_ROUNDS=${AB_ROUNDS:-2} \
  bash tools/device_gpu_run.sh build ab-quick 2>&1 | tee "$OUT/ab.log" | grep -E "^---|^ +[0-9]+ +[0-9]+ +[0-9]+ +[0-9]+ +[ny] \|"
for spec in $TREES; do
  n=${spec%%=*}
  echo "=== quick tests on $n"
  (cd /tmp && PYTHONPATH=/tmp/ab_$n:/tmp/site timeout 240 python3 -m pytest --rootdir="$REPO" \
    "$REPO/tests/test_decode_cuda.py" -q -x -k "not grid or (b1 and 4096)" -p no:cacheprovider) 2>&1 \
    | tee "$OUT/pytest_$n.log" | tail -3
done
