#!/usr/bin/env bash
# Every GPU measurement the issues ask for, sized to the device lease: 15 minutes of device time a
# session (machine start, every call and idle wait together), at most 10 minutes a call, 8 files back.
# Run from the repo root on the GPU machine, after `bash ../shared/gpu-wheels.sh` here (it fills
# .whl/, which the call carries):
#
#   bash bench/gpu_suite.sh [BUDGET_S]      # every part that fits in BUDGET_S seconds (default 540)
#   bash bench/gpu_suite.sh PART ...        # the named parts only, each given the whole budget
#
# Parts, in the order they run: the figures no lease has measured since the code they depend on
# changed first, then the ones the leases measured (2026-11-30 and three times 2026-12-04, H200;
# in brackets what each took then, bench/RESULTS.md), since a session's device time fits about half:
#   check     versions; the GPU tests (marked gpu, and the Triton MoE kernel tests: CUDA graphs,
#             the harness on CUDA; not the AOTInductor ones, which crash on torch 2.11)   ~2 min [89 s]
#   wan       1.3B shape in WanPipeline: eager, regional compile and mixcache with caching off
#             (the baselines, again in this process), issue 3's forced schedules and its anchor
#             (diffusers' First-Block-Cache, regional, always reusing), issue 6's replayed preset
#             schedules                                                               ~4 min [252 s]
#   first     issue 2's first-generation goal: regional compilation's first call and first 40
#             calls at the 1.3B shape beside mixcache's with stamped blocks and with
#             background_compile, each in a fresh process with empty caches (wan's rows share one
#             process, so a later row may hit what an earlier one compiled)
#                                                   ~3 min [154 s for four rows of another set]
#   moe       issue 5: the MoE op (through TMA, and by pointers) against eager dispatch,
#             grouped_mm and dense, under the tile table taken from the last sweep, and the sweep
#             again (--sweep)                                                          ~2 min [83 s]
#   small     issues 4 and 6: the trained-model harness in GPU wall time, `small`, and where
#             `balanced`'s generation time goes (bench/call_costs.py)     ~3 min [152 s, 36 methods]
#   large     the same, `large`                                                ~4 min [222 s]
#   graphs    `small` again, its regions compiled by Inductor with CUDA graphs (mode
#             reduce-overhead): `balanced` beside the same backend computing everything, for
#             launch-bound calls where the eager rows above pay Python per kernel; table in log.txt
#                                                                                    ~1 min [44 s]
#   inductor  issue 2's whole-graph torch.compile row (131 s to compile) beside eager and
#             mixcache with caching off, in one process; then the exported model (AOTInductor)
#             in the same pipeline: export time, load time, per generation
#                                       ~6 min [319 s; the exported row crashed the process]
# Run only when named (their files would not fit beside the others' eight):
#   train     issue 4's GPU presets, small-gpu then large-gpu, each trained for TRAIN_BUDGET
#             seconds (default 150; the steps that fit, recorded), its condition check and
#             samples; both model folders come back as models.tar.part-aa, -ab, ... (15 MB
#             each): `cat models.tar.part-* | tar -xf - -C bench/models` here  ~7 min [-]
#   fp8       the 1.3B shape with its weights stored in float8 by diffusers' layerwise casting:
#             eager and mixcache (cache off, balanced) on it, beside mixcache with caching off,
#             seconds per generation and peak memory, into fp8.md                    ~3 min [-]
#
# Each part gets what is left of the budget and is stopped when that runs out; what it printed up to
# then still comes back (every script prints its rows as they finish; the harness writes its JSON
# after each method). A part that finishes leaves a mark in /tmp on the machine, so the same command
# again, on the still-warm machine, goes on where the last call stopped. Results land in $OUT (or
# ./gpu-out), at most 8 files: summary.md (printed last), log.txt, wan.md, moe.md, first.md,
# inductor.md, quality_large.json, quality_small.json. The harness tables and plots are rendered here from the
# JSON (`python bench/quality.py --from-json ...`); copy the tables into bench/RESULTS.md with the
# command and the date.
set -uo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
out=${OUT:-gpu-out}
done_dir=/tmp/gpu-suite-done
mkdir -p "$out" "$done_dir"
export PYTHONUNBUFFERED=1
# wan and first were last measured by the first lease, before the runtime stopped syncing a step
# (2bbe559); the fourth lease measured moe, graphs, small and large.
PARTS=(check wan first moe small large graphs inductor)
EXTRA=(train fp8)
# Seconds a part may take at most, where its running long would only starve the parts after it
# (the tests: a hang or a slow Triton compile must not eat the benchmarks' time).
declare -A CAP=([check]=240)

part() {
  case "$1" in
    check)
      # The tests marked gpu, and the Triton kernel tests (interpreted on the CPU, native here).
      # Four processes (pytest-xdist is on the image): the 29 tests took 195 s in one, most of
      # it compiling (Triton, Inductor, AOTInductor), which the machine's 16 cores can share.
      # Not the AOTInductor tests: on the image's torch 2.11 they crashed or hung at all three
      # leases (bench/RESULTS.md); `python3 -P -m pytest tests/test_export.py -k aoti` tries again.
      python3 -P -m pytest -q -p no:cacheprovider -n 4 tests -k "(gpu or kernel or task_map) and not aoti" ;;
    wan)
      # Against mixcache with caching off; the `inductor` part puts that beside plain Inductor.
      # Not again: `regions="blocks"` (settled by the first lease) and nested blocks (slower to
      # trace on the image's torch 2.11, and nest_blocks warns there).
      python3 bench/wan_speed.py --config 1.3b --steps 20 --only regional "mixcache (cache off)" \
        "mixcache step" "mixcache cfg" "mixcache blocks" "mixcache mix" replayed diffusers \
        > "$out/wan.md" ;;
    moe)
      python3 bench/moe_bench.py --sweep > "$out/moe.md" ;;
    large|small)
      # FLOPs are not recounted (--no-flop-count): they do not depend on the machine, the CPU run
      # has them, and the recount would take most of the device time.
      python3 bench/quality.py --model "$1" --device cuda --no-progress --no-flop-count \
        --mixcache 'preset quality="quality"' --mixcache 'preset balanced="balanced"' \
        --mixcache 'preset fast="fast"' --json "$out/quality_$1.json" &&
      python3 bench/call_costs.py --model "$1" --device cuda ;;   # into log.txt: a few seconds
    graphs)
      python3 bench/quality.py --model small --device cuda --no-progress --no-flop-count \
        --regions inductor --mode reduce-overhead --only "cache off" "preset" \
        --mixcache 'preset balanced="balanced"' ;;
    first)
      # Regional beside mixcache's shortest first generations: stamped blocks, and the regions
      # compiled in the background (the first 40 calls are a 20-step CFG generation's).
      python3 bench/first_call.py --device cuda --config 1.3b --layers 30 --calls 40 \
        --only regional "regions=blocks, blocks stamped" background > "$out/first.md" ;;
    train)
      # Videos rendered by 12 of the 16 cores (one renders a batch in 0.4 s: the GPU would wait).
      for preset in small-gpu large-gpu; do
        python3 bench/train.py train --preset "$preset" --device cuda --bf16-autocast --workers 12 \
          --budget "${TRAIN_BUDGET:-150}" --no-progress || return
      done
      tar -cf - -C bench/models small-gpu large-gpu | split -b 15m - "$out/models.tar.part-" ;;
    fp8)
      # Weights stored in float8 by diffusers' layerwise casting (passes/casting.py): time and
      # peak memory of eager and mixcache on it, beside mixcache with bf16 weights.
      python3 bench/wan_speed.py --config 1.3b --steps 20 --only "mixcache (cache off)" fp8 \
        > "$out/fp8.md" ;;
    inductor)
      # "mixcache (cache off)" alone: a bare "cache off" would also pick the blocks-compiled and
      # nested rows, a minute of device time for figures `wan` and `first` give.
      python3 bench/wan_speed.py --config 1.3b --steps 20 --only "torch.compile" \
        "mixcache (cache off)" exported > "$out/inductor.md" ;;
    *)
      echo "unknown part $1; parts: ${PARTS[*]} ${EXTRA[*]}" >&2; return 2 ;;
  esac
}

# Children (`bash gpu_suite.sh --part NAME`, under `timeout`) run one part and nothing else. Each
# run starts with empty Inductor and Triton caches: the first-generation column is compile time,
# and a part run again on a warm machine would otherwise report the last run's cache hits.
if [ "${1:-}" = --part ]; then
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) part "$2"
  exit
fi

budget=540
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  budget=$1
  shift
fi
selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=("${PARTS[@]}")
for p in "${selected[@]}"; do
  [[ " ${PARTS[*]} ${EXTRA[*]} " == *" $p "* ]] || { echo "unknown part $p; parts: ${PARTS[*]} ${EXTRA[*]}" >&2; exit 2; }
done
deadline=$((SECONDS + budget))
log=$out/log.txt
summary=$out/summary.md

# The wheels (diffusers), once per machine.
if [ -d .whl ] && ! PYTHONPATH=/tmp/site python3 -c 'import diffusers' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
# The package itself, installed (not just put on the path): its subpackages live in passes/,
# runtime/ and kernels/ at the root and the backend registers through its entry point, so only an
# install has both. --no-deps and no build isolation: nothing can be fetched there, and the image
# has setuptools. Reinstalled every call (the tree may have changed). The source tree must not
# shadow it: scripts run as `python3 FILE` (their own folder goes first on the path, not the root)
# and pytest as `python3 -P -m pytest` (no current folder).
rm -rf /tmp/dit
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
  --target /tmp/dit . || exit 1
export PYTHONPATH=/tmp/site:/tmp/dit
{
  echo "# GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${budget} s"
  echo
  python3 -P - <<'PY'
import sys, torch, triton, diffusers
import dit_compile
if not torch.cuda.is_available():
    sys.exit("bench/gpu_suite.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
if not dit_compile.__file__.startswith("/tmp/dit/"):
    sys.exit(f"dit_compile imported from {dit_compile.__file__}, not the install in /tmp/dit")
torch._dynamo.lookup_backend("mixcache")      # registered through the entry point
print("torch", torch.__version__, "| triton", triton.__version__, "| diffusers", diffusers.__version__,
      "|", torch.cuda.get_device_name())
PY
} > "$summary" 2>&1 || { cat "$summary"; exit 1; }
printf '\n| part | result | seconds |\n|---|---|---|\n' >> "$summary"

for p in "${selected[@]}"; do
  if [ -e "$done_dir/$p" ]; then
    echo "| $p | done by an earlier call on this machine | |" >> "$summary"
    continue
  fi
  left=$((deadline - SECONDS))
  limit=$left
  [ -n "${CAP[$p]:-}" ] && [ "${CAP[$p]}" -lt "$limit" ] && limit=${CAP[$p]}
  if [ "$left" -lt 30 ]; then
    echo "| $p | not started: ${left} s of the budget left | |" >> "$summary"
    continue
  fi
  echo "== $p ($left s left) ==" >> "$log"
  start=$SECONDS
  # timeout signals the part's whole process group (python and its compile workers).
  timeout --kill-after=10 "$limit" bash "$self" --part "$p" >> "$log" 2>&1
  rc=$?
  took=$((SECONDS - start))
  case $rc in
    0) touch "$done_dir/$p"; result=ok ;;
    124|137) result="stopped after ${limit} s (partial output)" ;;
    *) result="failed, exit $rc (see log.txt)" ;;
  esac
  echo "| $p | $result | $took |" >> "$summary"
done
# The reply shows the end of the output: the log's last lines, then the summary.
tail -n 40 "$log"
echo
cat "$summary"
