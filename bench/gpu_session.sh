#!/usr/bin/env bash
# The prepared device check for a session that is lent a GPU: the gpu test tier, then bench/gpu.py,
# in one call, with logs and the JSON report under $OUT.
#
#   bench/gpu_session.sh --fetch-wheels     here (has PyPI): the pinned packages the device image
#                                           lacks, as Python 3.12 wheels, into .whl/ (git-ignored)
#   bash bench/gpu_session.sh               there, in one run call with carry [".whl"], timeout_s 560:
#                                           the eager gpu tests (<= 270 s), then the benchmark (<= 230 s)
#   bash bench/gpu_session.sh flow          a call of its own: bench/gpu.py --models flux,sd35, the memory
#                                           levers on the real shapes (~6-7 min, estimated)
#   bash bench/gpu_session.sh compiled      a second call if device time is left: the torch.compile tests
#   bash bench/gpu_session.sh io            checkpoint save/load against plain safetensors on that machine's
#                                           16 cores and disk (bench/checkpoint_io.py, demo and SDXL-sized; ~2 min)
#
# Each half has its own time cap, so a hang in one still leaves the other's figures; the device
# image's own torch (a CUDA build) is used, never the CPU one from requirements.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="diffusers==0.42.1 prodigyopt==1.1.2 peft==0.21.2 transformers==5.23.0 pydantic==2.14.3 pydantic-core==2.50.4
xxhash==4.1.0 annotated-types==0.7.0 typing-inspection==0.4.4 typing-extensions==4.16.0 importlib-metadata==8.7.0
pytest-xdist==3.8.0 execnet==2.1.2"

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS
  ls -l .whl
  exit
fi

OUT="${OUT:-/tmp/lathe-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
{ nvidia-smi; python3 -c "import torch, diffusers, transformers, peft; print(torch.__version__, torch.cuda.get_device_name(0), diffusers.__version__, transformers.__version__, peft.__version__)"; } \
  2>&1 | tee "$OUT/device.txt"
python3 -m backend demo-assets demo > "$OUT/demo-assets.log" 2>&1 || { tail -20 "$OUT/demo-assets.log"; exit 1; }

if [ "${1:-}" = "compiled" ]; then
  timeout 420 python3 -m pytest -n 0 -m gpu -p no:cacheprovider -q -rs -k "compiled" 2>&1 | tee "$OUT/gpu-tests-compiled.log"
  exit
fi
if [ "${1:-}" = "io" ]; then
  timeout 200 python3 bench/checkpoint_io.py --reps 7 --no-resume --json "$OUT/io-demo.json" 2>&1 | tee "$OUT/io-demo.log"
  timeout 300 python3 bench/checkpoint_io.py --reps 5 --model sdxl --rank 32 --no-resume --json "$OUT/io-sdxl.json" \
    2>&1 | tee "$OUT/io-sdxl.log"
  exit
fi
if [ "${1:-}" = "flow" ]; then
  timeout 540 python3 bench/gpu.py --models flux,sd35 --json "$OUT/gpu-flow.json" 2>&1 | tee "$OUT/bench-flow.log"
  exit
fi
# 1. The gpu test tier without torch.compile (fp16, bf16, the fp16 resume, verify).
timeout 270 python3 -m pytest -n 0 -m gpu -p no:cacheprovider -q -rs -k "not compiled" 2>&1 | tee "$OUT/gpu-tests.log"
# 2. The benchmark: full-size SD1.5 and SDXL UNets, bf16, Lathe vs a bare loop, each in its own process.
timeout 230 python3 bench/gpu.py --json "$OUT/gpu.json" --steps 12 2>&1 | tee "$OUT/bench.log"
echo "gpu session done"
