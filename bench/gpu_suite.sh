#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in four parts that each fit one device call (10 min).
# Run from the repo root on the GPU machine, after `bash ../shared/gpu-wheels.sh` here (it fills
# .whl/, which the call carries). Logs and tables land in $OUT (or ./gpu-out), one file per part:
#
#   bash bench/gpu_suite.sh tests     # GPU-only tests (Triton MoE kernel, CUDA harness), MoE bench
#   bash bench/gpu_suite.sh speed     # issue 2: eager / torch.compile / regional / mixcache off
#   bash bench/gpu_suite.sh caching   # issues 3 and 6: forced and replayed schedules at 1.3B shape
#   bash bench/gpu_suite.sh harness   # issues 4 and 6: the trained-model harness in GPU wall time
#
# Each part prints its tables; copy them into bench/RESULTS.md with the command and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ! python3 -c 'import diffusers' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
# The package itself: on the path, not installed (pip would try to resolve torch).
export PYTHONPATH=${PYTHONPATH:-}:$PWD
python3 - <<'PY' | tee "$out/versions.txt" || exit 1
import sys, torch, triton, diffusers
if not torch.cuda.is_available():
    sys.exit("bench/gpu_suite.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
print("torch", torch.__version__, "triton", triton.__version__, "diffusers", diffusers.__version__,
      torch.cuda.get_device_name())
PY

case "${1:-}" in
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_moe.py tests/test_quality.py -k "cuda or moe" \
      2>&1 | tee "$out/tests.log"
    python3 bench/moe_bench.py 2>&1 | tee "$out/moe_bench.md"
    ;;
  speed)
    python3 bench/wan_speed.py --config 1.3b --steps 20 --only "torch.compile" regional "cache off" \
      2>&1 | tee "$out/wan_speed_backend.md"
    ;;
  caching)
    python3 bench/wan_speed.py --config 1.3b --steps 20 --only "torch.compile" "mixcache " replayed \
      2>&1 | tee "$out/wan_speed_caching.md"
    ;;
  harness)
    for m in large small; do
      python3 bench/quality.py --model "$m" --device cuda --no-progress \
        --mixcache 'preset quality="quality"' --mixcache 'preset balanced="balanced"' \
        --mixcache 'preset fast="fast"' --json "$out/quality_$m.json" \
        --plot "$out/quality_$m.png" 2>&1 | tee "$out/quality_$m.md"
    done
    ;;
  *)
    echo "usage: bash bench/gpu_suite.sh tests|speed|caching|harness" >&2
    exit 2
    ;;
esac
