#!/usr/bin/env bash
# The prepared GPU run (one call of the device tool, H200 image: Python 3.12 with torch, accelerate, transformers).
#
#   bash benchmarks/gpu_check.sh fetch   # here, once: wheels of what the GPU image lacks into .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh run     # there, with `.whl` carried: bench at batch 128 in bf16, then the tests
#
# `run` writes gpu.txt, bench.txt and tests.txt under $OUT (or ./gpu-check-out); copy the figures with this command
# into benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."

# Our dependencies that the device image does not hold (its package list: the device tool's KINDS.md), at the
# versions this project's .venv resolved from constraints.txt.
MISSING="albucore albumentations annotated-types datasets diffusers dill httpcore2 httpx2 huggingface-hub
importlib-metadata lazy-importer multiprocess pydantic pydantic-core simsimd stringzilla torchdata truststore
typing-inspection tzdata"

fetch() {
    mkdir -p .whl
    local freeze name pin
    freeze=$(.venv/bin/python -m pip freeze)
    for name in $MISSING; do
        pin=$(echo "$freeze" | grep -i -E "^${name//-/[-_.]}==" || true)
        [ -n "$pin" ] || { echo "no $name in .venv: run scripts/setup_env.sh first" >&2; exit 1; }
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$pin" || exit 1
    done
    du -sh .whl
}

run() {
    local out="${OUT:-gpu-check-out}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"
    python3 benchmarks/bench_train_step.py --preset pipelines/ddpm-cifar10-32 --batch-size 128 --steps 50 \
        --device cuda --mixed-precision bf16 --peak-tflops 989 2>&1 | tee "$out/bench.txt"
    # Our fastest path (bf16, channels_last, torch.compile) against the example at its default fp32.
    python3 benchmarks/bench_train_step.py --preset pipelines/ddpm-cifar10-32 --batch-size 128 --steps 50 \
        --device cuda --mixed-precision bf16 --peer-mixed-precision no --channels-last --compile --peak-tflops 989 \
        2>&1 | tee -a "$out/bench.txt"
    python3 -m pytest -q -n 4 -p no:cacheprovider -rs tests 2>&1 | tail -60 | tee "$out/tests.txt"
}

case "${1:-}" in
    fetch) fetch ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_check.sh fetch|run" >&2; exit 2 ;;
esac
