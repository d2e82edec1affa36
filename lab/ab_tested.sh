#!/usr/bin/env bash
# A/B on a Hopper machine (as lab/gpu_run.sh): ab-quick of lab/gpu_run.sh (this tree built as the base, each
# AB_TREES build alternating with it for AB_ROUNDS rounds, --only-ours on ROWS), then the quick GPU suite
# (lab/gpu_run.sh test-quick) on each AB_TREES build, since ab-quick only times them. Usage:
#   AB_TREES="name=-DFLAG=1 ..." [ROWS="b,s_q,h_q,s_k,varlen;..."] [AB_ROUNDS=2] bash lab/ab_tested.sh
set -uo pipefail
R=${ROWS:-"128,1,128,8192,0;128,2,128,8192,0;128,1,128,8192,1;128,2,64,4096,0"}
TREES=${AB_TREES:?set AB_TREES}
AB_TREES=$TREES AB_BENCH="--only-ours --rows $R" AB_ROUNDS=${AB_ROUNDS:-2} \
  bash lab/gpu_run.sh build ab-quick 2>&1 | tee "$OUT/ab.log" | grep -E "^---|^ +[0-9]+ +[0-9]+ +[0-9]+ +[0-9]+ +[ny] \|"
for spec in $TREES; do
  n=${spec%%=*}
  echo "=== quick tests on $n"
  QUICK_SITE=/tmp/ab_$n bash lab/gpu_run.sh test-quick 2>&1 | tail -3
done
