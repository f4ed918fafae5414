#!/usr/bin/env bash
# Every GPU measurement issue 17 needs, in one command, each step under its own `timeout` (sum of the limits:
# 410 s, so the whole run stays under 7 minutes on an H200). JSON and logs go to "$OUT" (default ./out):
#
#   env.json         device, driver, torch / triton versions, date
#   cmli_knobs.json  bench_cmli: --tune 1024 times every CMLI knob (fwd ARGMAX 0/1/2 and tiles, bwd_w SPLIT_I
#                    1/2/4/8, bwd_v tiles) and --tune-ranking the ranking tiles, keeping the fastest of each;
#                    --check: triton fp32 and bf16 scores / gradients / ranking vs float64 (targets: bf16 scores
#                    1e-3, gradients 1e-2); then fwd+bwd at 1024 with the tuned tiles, and the ranking (chunked
#                    and fused) in ratio to one [B*N, d] @ [d, B*M] matmul (target: fused <= 1.5x)
#   cmli_large.json  bench_cmli at 2048 and 4096 (the largest batch the README promises): triton completes,
#                    --check-large 4096 compares triton with chunked (index arithmetic past 2**31), ranking too;
#                    compiled_variants shows that new batch sizes compiled no new kernel binaries
#   train_rows.json  bench_train part (e) at batch 1024 and 2048, small preset, bf16, eager and compiled: CLIP,
#                    FILIP, FILIP with 25% selection: step, loss alone, ranking alone (target: selection / CLIP
#                    step <= 1.10 at 1024, and selection faster than no selection). Rows are written as they
#                    finish; past --time-budget 120 s the rest are skipped (likely the compiled 2048 ones, after
#                    torch.compile's first graphs): rerun this step alone with a larger budget if they matter
#
#   bash benchmarks/gpu_issue17.sh                     # on the GPU machine
#   DRY_RUN=1 OUT=/tmp/o bash benchmarks/gpu_issue17.sh  # CPU, tiny sizes, Triton interpreter: catches typos only;
#                                                      # its numbers mean nothing
# Exit status 0 only if every step succeeded.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"

if [ "${DRY_RUN:-0}" = 1 ]; then
    export TRITON_INTERPRET=1
    CMLI="--device cpu --N 9 --M 5 --D 16 --budget-ms 1"  # 2 repeats per measurement
    B=4; B2=5; BIG=6
    TRAIN="--device cpu --loss-batches 4 --steps 1 --warmup 1"
    COMPILE=""  # inductor on the CPU takes minutes; the compiled path is the same code with --compile
else
    CMLI="--device cuda --budget-ms 500"  # 500 ms of repeats per measurement (2..20 of them)
    B=1024; B2=2048; BIG=4096
    TRAIN="--device cuda --loss-batches 1024,2048 --steps 3 --warmup 2 --time-budget 120"
    COMPILE="--compile"
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
fi

status=0
step() {  # step NAME LIMIT_S command...: runs it under timeout, log in $OUT/NAME.log, tail shown
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || status=1
}

step env 10 python -c "
import json, sys, datetime, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
cuda = torch.cuda.is_available()
json.dump(dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
               device=torch.cuda.get_device_name() if cuda else 'cpu', torch=torch.__version__, triton=tv,
               cuda=torch.version.cuda, python=sys.version.split()[0]), open('$OUT/env.json', 'w'), indent=1)
print(open('$OUT/env.json').read())"

step cmli_knobs 150 python benchmarks/bench_cmli.py $CMLI --tune $B --tune-ranking $B --check \
    --batches $B --impls triton --ranking --json "$OUT/cmli_knobs.json" --overwrite

step cmli_large 90 python benchmarks/bench_cmli.py $CMLI --check-large $BIG --batches $B2 $BIG --impls triton \
    --ranking --json "$OUT/cmli_large.json" --overwrite

step train_rows 160 python benchmarks/bench_train.py $TRAIN --only-loss-rows $COMPILE \
    --json "$OUT/train_rows.json" --overwrite

echo "== done: JSON in $OUT, exit $status"
exit $status
