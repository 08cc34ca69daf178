#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in four parts that each fit one device call (10 min).
# Run from the repo root on the GPU machine, after `bash ../shared/gpu-wheels.sh` here (it fills
# .whl/, which the call carries). Logs and tables land in $OUT (or ./gpu-out), one file per part:
#
#   bash bench/gpu_suite.sh tests     # GPU-only tests (Triton MoE kernel, CUDA harness), MoE bench
#   bash bench/gpu_suite.sh speed     # issue 2: eager / torch.compile / regional / mixcache off
#   bash bench/gpu_suite.sh caching   # issues 3 and 6: forced and replayed schedules at 1.3B shape
#   bash bench/gpu_suite.sh harness [large|small]   # issues 4, 6: trained-model harness, GPU wall time
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
fi
# The package itself, installed (not just put on the path): its subpackages live in passes/,
# runtime/ and kernels/ at the root and the backend registers through its entry point, so only an
# install has both. --no-deps and no build isolation: nothing can be fetched there, and the image has
# setuptools. The source tree must not shadow it: scripts run as `python3 FILE` (their own folder
# goes first on the path, not the root) and pytest as `python3 -P -m pytest` (no current folder).
rm -rf /tmp/dit
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
  --target /tmp/dit . || exit 1
export PYTHONPATH=/tmp/site:/tmp/dit
python3 -P - <<'PY' | tee "$out/versions.txt" || exit 1
import sys, torch, triton, diffusers
import dit_compile
if not torch.cuda.is_available():
    sys.exit("bench/gpu_suite.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
if not dit_compile.__file__.startswith("/tmp/dit/"):
    sys.exit(f"dit_compile imported from {dit_compile.__file__}, not the install in /tmp/dit")
torch._dynamo.lookup_backend("mixcache")      # registered through the entry point
print("torch", torch.__version__, "triton", triton.__version__, "diffusers", diffusers.__version__,
      torch.cuda.get_device_name())
PY

case "${1:-}" in
  tests)
    python3 -P -m pytest -q -p no:cacheprovider tests/test_moe.py tests/test_quality.py \
      -k "cuda or gpu or kernel or task_map" 2>&1 | tee "$out/tests.log"
    python3 bench/moe_bench.py 2>&1 | tee "$out/moe_bench.md"
    ;;
  speed)
    python3 bench/wan_speed.py --config 1.3b --steps 20 --only "torch.compile" regional "cache off" \
      2>&1 | tee "$out/wan_speed_backend.md"
    ;;
  caching)
    # Against mixcache with caching off (its row in `speed` says how close it is to Inductor):
    # plain Inductor's whole-graph compile would cost another ~2.5 min of device time here.
    python3 bench/wan_speed.py --config 1.3b --steps 20 --only "mixcache " replayed \
      2>&1 | tee "$out/wan_speed_caching.md"
    ;;
  harness)
    # FLOPs are not recounted here (--no-flop-count): they do not depend on the machine, the CPU
    # run has them, and the recount would take most of the device time. Rows land in the JSON as
    # each method finishes. `harness large` or `harness small` runs one model.
    for m in ${2:-large small}; do
      python3 bench/quality.py --model "$m" --device cuda --no-progress --no-flop-count \
        --mixcache 'preset quality="quality"' --mixcache 'preset balanced="balanced"' \
        --mixcache 'preset fast="fast"' --json "$out/quality_$m.json" \
        --plot "$out/quality_$m.png" 2>&1 | tee "$out/quality_$m.md"
    done
    ;;
  *)
    echo "usage: bash bench/gpu_suite.sh tests|speed|caching|harness [large|small]" >&2
    exit 2
    ;;
esac
