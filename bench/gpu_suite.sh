#!/usr/bin/env bash
# The GPU suite, one `device` call (< 10 minutes: everything ends by 580 s): install the tree,
# print the GPU and versions, run the GPU tests, compute-sanitizer on the CUDA kernels, the
# bench with peers (results.json keeps every finished case, whatever stops it), then A/B checks
# of candidate configurations. Everything lands in $OUT (results.json, report.md, report.html,
# plots, suite.log); the tables print last.
#
#   run: bash bench/gpu_suite.sh        (carry .whl for the peers: see README, "GPU suite")
#        bash bench/gpu_suite.sh tune   (instead of the tests and compute-sanitizer: autotune every
#                                        op for up to 220 s, export the choices to $OUT/tuned.json,
#                                        measure one whole space (--exhaustive: how near the search
#                                        gets), then the bench with the tuned choices)
#        BENCH_OPS="rnn selective_scan" bash bench/gpu_suite.sh   (the bench times only these op
#                                        families: a run that must reach the ones its budget left out)
set -uo pipefail
MODE=${1:-check}
case "$MODE" in check|tune) ;; *) echo "usage: bash bench/gpu_suite.sh [check|tune]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rnnops-gpu}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
START=$(date +%s)
section() { echo; echo "=== $* ($(date +%T))"; }
seconds_until() { echo $((START + $1 - $(date +%s))); }  # seconds left until $1 s after the start

{
  section install
  python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  for wheel in .whl/*.whl; do  # one at a time: a wheel built for another Python must not block the rest
    [ -e "$wheel" ] || continue
    python -m pip install -q --no-index --no-deps --target /tmp/peers "$wheel" || echo "not installed: $wheel"
  done
  export PYTHONPATH=/tmp/peers:${PYTHONPATH:-}

  section versions
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python - <<'PY'
import importlib.metadata as md, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
for pkg in ("fla-core", "flashrnn", "mamba-ssm", "cupy-cuda13x", "cupy-cuda12x"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "not installed")
PY
  nvcc --version | tail -1

  if [ "$MODE" = tune ]; then
    section autotune
    timeout 250 python -m rnnops autotune --ops all --budget-s 220 --export "$OUT/tuned.json"
    section "autotune --exhaustive (the search's check)"
    # 90 legal configurations, each compiled in a worker process first (8 at a time)
    timeout 150 python -m rnnops autotune --exhaustive --ops rnn --shapes "cell=lstm,B=16,T=1024,H=24,D=32" \
      --budget-s 130
  else
    section "GPU tests"
    # 8 workers: most of the time is compiling (Triton and NVRTC: hundreds of specialisations on a
    # cold cache, about a second each); up to 50 failures are listed rather than stopping at the
    # first. Blocking launches: a kernel that faults fails its own test, not the next one in its
    # worker.
    CUDA_LAUNCH_BLOCKING=1 timeout 200 python -m pytest -m gpu -q -n 8 --maxfail=50 -p no:cacheprovider tests

    section "compute-sanitizer"
    for tool in memcheck racecheck; do
      timeout 60 compute-sanitizer --tool $tool --error-exitcode 1 python bench/sanitize.py && echo "$tool: clean"
    done
  fi

  section bench
  # the bench starts no case after its budget (check mode: until 400 s, leaving the A/B checks
  # below their time; tune mode: 520 s), its op families taking turns; results.json holds every
  # finished case even if the timeout has to kill it mid-case
  [ "$MODE" = tune ] && end=520 || end=400
  budget=$((end - $(date +%s) + START))
  [ "$budget" -lt 20 ] && budget=20  # (`timeout 0` would mean no limit at all)
  # shellcheck disable=SC2086  # BENCH_OPS is a list of op families, one word each
  timeout $((budget + 60)) python -m rnnops bench --quick --peers --profile --budget-s "$budget" --out "$OUT" \
    ${BENCH_OPS:+--ops $BENCH_OPS}

  if [ "$MODE" = check ]; then
    section "A/B: the shipped configuration against candidate changes (nothing stored)"
    # each A/B check has until its end time, and starts no measurement in its last 15 s.
    # linear attention: the delta rule ships 4 warps x 1 stage on the H100 and H200 since
    # 2026-11-26 (1.17-1.21x f+b, plain, gated and DeltaProduct); the same for plain linear attention
    left=$(seconds_until 460)
    [ "$left" -gt 30 ] && timeout $left python -m rnnops autotune --ops linear_attn --budget-s $((left - 15)) \
      --shapes "B=8,T=4096,H=16,K=128,V=128,gate=none" --try '{"num_warps": 4, "num_stages": 1}'
    # the LSTM at D = 64: the Triton cells (RESIDENT, one program per head and 16 batch rows) at 4
    # warps, half the threads at every step's barriers; the CUDA cells with a head in one block
    # (64 units) or two (32), where the shipped 16 units split it over four that meet at a grid
    # barrier every step (its backward took 8.1 of 14.2 ms f+b on the H100, Triton's 3.8); and the
    # Triton cells recomputing the pre-activations in the backward (fewer forward barriers, no
    # 200 MB of saved fp32 pre-activations, a longer backward step: triton_kernels/rnn.py RECOMPUTE)
    left=$(seconds_until 515)
    [ "$left" -gt 30 ] && timeout $left python -m rnnops autotune --ops rnn --budget-s $((left - 15)) \
      --shapes "cell=lstm,B=16,T=1024,H=12,D=64" --try '{"num_warps": 4}' '{"recompute": 1}' '{"units": 64}' \
      '{"units": 32}'
    # the selective scan on the H100: the Triton scan ships 16 channels x 32-step chunks since
    # 2026-11-26 (1.14x over 8 x 128 on the H200; measured before its n-major state tiles, which
    # cut the instructions per element most at wide blocks): against the former 8 x 128, 128-step
    # chunks (the cost model's pick), its forward at 32 and 8 channels a program (ships 16: the
    # cost model's guess); and the CUDA scan's 4 warps (1.10x on the H200; 2 warps 1.03x on the H100)
    left=$(seconds_until 560)
    [ "$left" -gt 30 ] && timeout $left python -m rnnops autotune --ops selective_scan --budget-s $((left - 15)) \
      --shapes "B=8,T=2048,Dm=2048,N=16" --try '{"block_d": 8, "chunk": 128}' '{"chunk": 128}' \
      '{"forward_block_d": 32}' '{"forward_block_d": 8}' '{"warps": 4}'
    # a prompt's prefill (B = 1): the Triton scan in 8 segments a sequence (shipped, the cost
    # model's pick: one segment leaves 128 one-warp programs) against one
    left=$(seconds_until 590)
    [ "$left" -gt 25 ] && timeout $left python -m rnnops autotune --ops selective_scan --budget-s $((left - 10)) \
      --shapes "B=1,T=8192,Dm=2048,N=16" --try '{"segments": 1}'
  fi
} 2>&1 | tee "$LOG"

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd '[:alnum:]-' | tr '[:upper:]' '[:lower:]')
echo
echo "commit with: cp \$files_at/results.json bench/results/${gpu:-unknown-gpu}-$(date +%F).json"
if [ "$MODE" = tune ]; then
  echo "and merge \$files_at/tuned.json's entries (measured choices) into autotune/defaults/"
fi
