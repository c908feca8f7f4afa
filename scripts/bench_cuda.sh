#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, as run on a lent GPU machine (one command per part):
#   bash scripts/bench_cuda.sh check      # versions, the CUDA tests, the tiny sizes (tests: the CUDA tests alone)
#   bash scripts/bench_cuda.sh sd15       # generation and training at Stable Diffusion 1.5's sizes
#   bash scripts/bench_cuda.sh switches   # fast switches at sd15: fused QKV + NHWC, compiled training step
#   bash scripts/bench_cuda.sh graphs     # generation at sd15 with CUDA graphs, eager and compiled
# What the first lease left open, each part under the device's 10-minute call limit:
#   bash scripts/bench_cuda.sh next-generate  # SDPA backends at sd15's shapes; regional compilation, static shapes
#   bash scripts/bench_cuda.sh next-full      # --compile full with CUDA graphs (no cold-start processes)
#   bash scripts/bench_cuda.sh next-train     # the compiled training step at batch 32, and with GEMM autotuning
#   bash scripts/bench_cuda.sh next-loader    # 512 px batches from JPEGs on the machine's cores, beside a 180 ms step
# Packages that machine lacks travel as wheels in .whl/ (installed into /tmp/site); logs go to $OUT.
# DRY_RUN=1 runs a part's commands on this machine's CPU at the tiny size, so that a lease is not spent on a typo.
set -u
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-/tmp/t2i-bench-cuda}
mkdir -p "$OUT"
if [ "$DRY_RUN" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
GEN="scripts/bench_generate.py --size sd15 --device cuda --steps 30 --guidance 7.5"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, keep going on failure
    local name=$1 limit=$2; shift 2
    if [ "$DRY_RUN" = 1 ]; then  # the same command at the tiny size on the CPU: sd15 -> tiny, cuda -> cpu, 512 px -> 64
        set -- $(printf '%s\n' "$@" | sed -e 's/^sd15$/tiny/' -e 's/^cuda$/cpu/' -e 's/^512$/64/' \
            | awk 'prev == "--cuda-graphs" { $0 = "off" } { prev = $0; print }')
    fi
    echo "=== $name: $*"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^\s*$" | tail -n 25
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s"
}
case ${1:-check} in
check)
    [ "$DRY_RUN" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, diffusers, transformers, accelerate, open_clip; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, \
'open_clip', open_clip.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    ;&
tests)
    step cuda-tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
    [ "${1:-check}" = tests ] && exit 0
    step tiny-generate 120 python3 scripts/bench_generate.py --size tiny --device cuda --no-cold
    step tiny-train 120 python3 scripts/bench_train.py --size tiny --device cuda --steps 5
    ;;
sd15)
    step sd15-generate 420 python3 $GEN --cuda-graphs off --json "$OUT/sd15-generate.json"
    step sd15-train-512 240 python3 scripts/bench_train.py --size sd15 --device cuda --resolution 512 --batch 16 \
        --steps 5 --blocks 3
    ;;
switches)
    step sd15-fuse-qkv-channels-last 150 python3 $GEN --no-cold --fuse-qkv --channels-last --cuda-graphs off
    TRAIN="scripts/bench_train.py --size sd15 --device cuda --resolution 512 --batch 16 --steps 5 --blocks 3"
    step sd15-train-channels-last 120 python3 $TRAIN --set train.unet.channels_last=true
    step sd15-train-compiled 300 python3 $TRAIN --set train.unet.compile=true
    ;;
graphs)
    step sd15-cuda-graphs 200 python3 $GEN --no-cold --cuda-graphs on
    step sd15-compile-blocks-graphs 400 python3 $GEN --compile blocks --cuda-graphs on --json "$OUT/sd15-blocks-graphs.json"
    ;;
next-loader)
    LOADER="scripts/bench_loader.py --synthetic 400 --resolution 512 --batch 16 --step-ms 180"
    step loader-folder 240 python3 $LOADER --workers 0 2 4 8
    step loader-shards 240 python3 $LOADER --shards --workers 0 1 2 4 8
    ;;
next-generate)
    step sd15-attention 90 python3 scripts/bench_attention.py --size sd15 --device cuda
    step sd15-blocks-static 300 python3 $GEN --no-cold --compile blocks --json "$OUT/sd15-blocks-static.json"
    ;;
next-full)
    # MEASURED.md saw diffusers' U-Net take over 8 minutes to compile whole on the H100: no cold-start processes
    # here (they would compile twice more); if this finishes, time the cold start in a part of its own.
    step sd15-full-graphs 540 python3 $GEN --no-cold --compile full --json "$OUT/sd15-full-graphs.json"
    ;;
next-train)
    TRAIN="scripts/bench_train.py --size sd15 --device cuda --resolution 512 --steps 5 --blocks 3"
    step sd15-train-compiled-b32 240 python3 $TRAIN --batch 32 --set train.unet.compile=true
    step sd15-train-compiled-autotune 300 env TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 python3 $TRAIN --batch 16 \
        --set train.unet.compile=true
    ;;
*)
    echo "unknown part '$1': check, tests, sd15, switches, graphs, next-generate, next-full, next-train or next-loader" >&2
    exit 2
    ;;
esac
