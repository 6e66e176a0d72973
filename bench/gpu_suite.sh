#!/usr/bin/env bash
# The GPU suite, one `device` call (< 10 minutes: everything ends by 592 s): install the tree
# and the last run's compiled kernels, print the GPU and versions, run the GPU tests,
# compute-sanitizer on the CUDA kernels, the bench with peers (results.json keeps every finished
# case, whatever stops it), A/B checks of candidate configurations, then pack the compiled
# kernels for the next run. Everything lands in $OUT (results.json, report.md, report.html with
# its plots, suite.log, compile-cache.tar.xz); the tables print last.
#
#   run: bash bench/gpu_suite.sh        (carry .whl for the peers and compile-cache.tar.xz: see
#                                        README, "GPU suite")
#        bash bench/gpu_suite.sh tune   (instead of the tests and compute-sanitizer: autotune every
#                                        op for up to 220 s, export the choices to $OUT/tuned.json,
#                                        measure one whole space (--exhaustive: how near the search
#                                        gets), then the bench with the tuned choices)
#        bash bench/gpu_suite.sh profile (instead of the tests, compute-sanitizer, the bench and the A/B
#                                        checks: Nsight Compute on the kernels of the cases where
#                                        rnnops trails a peer, each beside the peer's, into
#                                        $OUT/kernels.md: durations, throughputs, occupancy and the
#                                        largest stall reasons, rnnops.bench.kernel_profile; the
#                                        raw logs in $OUT/ncu-logs.tar.xz)
#        bash bench/gpu_suite.sh ab     (the A/B checks alone, with the whole call's time: a second
#                                        call after a check-mode one, on the warm machine)
#        BENCH_OPS="rnn selective_scan" bash bench/gpu_suite.sh   (the bench times only these op
#                                        families: a run that must reach the ones its budget left out)
#        BENCH_CASES="GLA|D768" bash bench/gpu_suite.sh   (only the cases whose name the regex finds)
set -uo pipefail
MODE=${1:-check}
case "$MODE" in check|tune|profile|ab) ;; *) echo "usage: bash bench/gpu_suite.sh [check|tune|profile|ab]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rnnops-gpu}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
START=$(date +%s)
section() { echo; echo "=== $* ($(date +%T))"; }
seconds_until() { echo $((START + $1 - $(date +%s))); }  # seconds left until $1 s after the start
# limit SECONDS COMMAND...: COMMAND stopped after SECONDS, and killed 10 s later if it has not
# stopped: a process stuck in compiled code does not act on timeout's SIGTERM (on 2026-11-28 the
# bench, compiling fla's chunk_gla, outlived its timeout and the call's 600 s with it)
limit() { timeout -k 10 "$@"; }

# the results files' prefix: the GPU's name, lower case, dashes for spaces
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd '[:alnum:]-' | tr '[:upper:]' '[:lower:]')
gpu=${gpu:-unknown-gpu}

{
  section install
  python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  for wheel in .whl/*.whl; do  # one at a time: a wheel built for another Python must not block the rest
    [ -e "$wheel" ] || continue
    python -m pip install -q --no-index --no-deps --target /tmp/peers "$wheel" || echo "not installed: $wheel"
  done
  export PYTHONPATH=/tmp/peers:${PYTHONPATH:-}
  # the kernels the last GPU run compiled (Triton's and cupy's disk caches, its compile-cache.tar.xz
  # copied to .whl/): each one unchanged since is a cache hit instead of a compile (about a second a
  # Triton kernel, seconds to minutes an NVRTC module; rnnops/bench/compile_cache.py)
  python -m rnnops.bench.compile_cache restore .whl/compile-cache.tar.xz
  # FlashRNN 1.0.8's gpu_info.cc reads eight cudaDeviceProp fields CUDA 13 removed, so its
  # cuda_fused backend failed ("Error building extension 'gpu_info2'", every run until 2026-11-26);
  # its fused kernels compile with nvcc 13 (sm_90, at the first ConstrINT solution for 1, 4 and 12
  # heads of a 768-wide LSTM: checked without a GPU, 2026-11-27). The installed copy reads 0 for
  # those fields, none of which FlashRNN uses to choose its tiles.
  info=/tmp/peers/flashrnn/flashrnn/gpu_info/gpu_info.cc
  [ -f "$info" ] && sed -i -E 's/prop\.(clockRate|computeMode|cooperativeMultiDeviceLaunch|deviceOverlap|kernelExecTimeoutEnabled|maxTexture1DLinear|memoryClockRate|singleToDoublePrecisionPerfRatio)\b/0/g' "$info"

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
  echo "repository: $PWD (in the NVRTC modules' -I option, so in cupy's cache keys)"

  if [ "$MODE" = tune ]; then
    section autotune
    limit 250 python -m rnnops autotune --ops all --budget-s 220 --export "$OUT/tuned.json"
    section "autotune --exhaustive (the search's check)"
    # 180 legal configurations, each compiled in a worker process first (8 at a time); the budget
    # may stop it short of all (the table says how many it measured)
    limit 150 python -m rnnops autotune --exhaustive --ops rnn --shapes "cell=lstm,B=16,T=1024,H=24,D=32" \
      --budget-s 130
  elif [ "$MODE" = check ]; then
    section "GPU tests"
    # 8 workers: most of the time is compiling (Triton and NVRTC: hundreds of specialisations on a
    # cold cache, about a second each); up to 50 failures are listed rather than stopping at the
    # first. Blocking launches: a kernel that faults fails its own test, not the next one in its
    # worker; the bench's timing test (host work hidden behind queued kernels) needs them
    # asynchronous and runs alone after. The 25 slowest tests are listed (186 of the 560 s on
    # 2026-11-27, when the bench then reached 2 of its 9 cases)
    overlap=tests/test_bench.py::test_gpu_timing_runs_calls_back_to_back
    # a test process the limit stops writes its threads' stacks first (tests/conftest.py): on
    # 2026-11-28 (cold caches) the limit stopped them after 117 of 144, with no summary
    stacks=/tmp/rnnops-stacks && rm -rf $stacks && mkdir -p $stacks
    RNNOPS_STACKS_ON_TERM=$stacks CUDA_LAUNCH_BLOCKING=1 limit 200 python -m pytest -m gpu -q -n 8 --maxfail=50 \
      -p no:cacheprovider --durations=25 --deselect $overlap tests
    for file in $stacks/*; do [ -s "$file" ] && { echo "--- stopped by the limit: $file"; cat "$file"; }; done
    limit 30 python -m pytest -q -p no:cacheprovider $overlap

    section "compute-sanitizer"
    for tool in memcheck racecheck; do
      limit 60 compute-sanitizer --tool $tool --error-exitcode 1 python bench/sanitize.py && echo "$tool: clean"
    done
  fi

  # the peers' autotuning choices stored by earlier runs on this GPU model (results files'
  # peer_autotune): their autotuners then compile one configuration a kernel instead of tens.
  # Those files also order the bench's op families: the ones they timed longest ago go first
  # (--stalest-first), so that runs the budget stops (2 of 9 cases on 2026-11-27) take turns.
  # fla stores its choices itself; TRITON_CACHE_AUTOTUNING has every other Triton autotuner
  # (FlashRNN's triton_fused forward) store them too (it changes no compiled kernel's hash)
  export TRITON_CACHE_AUTOTUNING=1
  shopt -s nullglob
  earlier=(bench/results/"$gpu"-*.json)
  shopt -u nullglob

  if [ "$MODE" = ab ]; then
    :  # no bench: the A/B checks below take the call's time
  elif [ "$MODE" = profile ]; then
    section "Nsight Compute: the kernels of the cases rnnops trails a peer on, beside the peer's"
    # (case regex | target | flags), most wanted first: the largest gaps of the H200 runs at c34bbff,
    # dd69b80 and 76b5d92 (the delta rule's f+b 0.98x, its backward state walk 0.458 ms against
    # fla's 0.316, which SASS read offline does not explain; the GVA forward 0.95x, the scalar
    # decay's 0.59x, the 768-wide LSTM head 0.71x, the 64-wide heads 0.93x, the Triton scan 0.92x)
    mapfile -t profiled <<'CASES'
^delta rule B8 T4096 H16|triton|
^delta rule B8 T4096 H16|fla.chunk_delta_rule|
^gated delta rule B8 T4096 H32 Hk16|triton|--forward-only
^gated delta rule B8 T4096 H32 Hk16|fla.chunk_gated_delta_rule|--forward-only
^scalar decay B8 T4096 H16|triton|--forward-only
^scalar decay B8 T4096 H16|fla.chunk_simple_gla|--forward-only
^lstm B16 T1024 H1 D768$|cuda|
^lstm B16 T1024 H1 D768$|flashrnn.cuda_fused|
^lstm B16 T1024 H12 D64$|cuda|
^lstm B16 T1024 H12 D64$|flashrnn.cuda_fused|
^Mamba-1 B8 T2048 D2048 N16$|triton|
^Mamba-1 B8 T2048 D2048 N16$|mamba_ssm.selective_scan_fn|
CASES
    # PROFILE_END: the second after the suite's start after which no ncu process starts (560; a call
    # right after a check run, on the machine still warm from it, has its caches: PROFILE_END=200
    # profiles the first few pairs). First every target once, side by side and unprofiled, so that
    # their kernels compile (Triton's and cupy's disk caches) and the peers' autotuners choose
    # before ncu runs them one by one (without a profiler, rnnops.bench.kernel_profile run's
    # cudaProfilerStart and Stop do nothing)
    end=${PROFILE_END:-560}
    # profile_run ENTRY: sets case and target, and run to the entry's kernel_profile command
    profile_run() {
      local flags
      IFS='|' read -r case target flags <<<"$1"
      # shellcheck disable=SC2206  # flags: zero or more words
      run=(python -m rnnops.bench.kernel_profile run --case "$case" --target "$target" $flags
           ${earlier[0]:+--peer-choices-from "${earlier[@]}"})
    }
    for entry in "${profiled[@]}"; do
      profile_run "$entry"
      limit $((end / 4)) "${run[@]}" </dev/null >/dev/null 2>&1 &
    done
    wait
    # then one ncu process a (case, target): a forward and a call unprofiled, one profiled; sections for
    # throughput, occupancy, launch shape and the warp-state (stall) counters; clocks left as
    # they are
    mkdir -p /tmp/ncu
    index=0
    for entry in "${profiled[@]}"; do
      profile_run "$entry"
      left=$(seconds_until "$end")
      [ "$left" -lt 30 ] && { echo "not profiled (time): $case | $target"; continue; }
      index=$((index + 1))
      log=/tmp/ncu/ncu-$(printf %02d $index)-$(echo "$case-$target" | tr -c 'A-Za-z0-9.\n' '_').csv
      limit $((left < 120 ? left : 120)) ncu --profile-from-start off --clock-control none \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --csv --page raw --log-file "$log" "${run[@]}" </dev/null || echo "ncu failed or timed out: $case | $target"
    done
    section "Nsight Compute summary"
    python -m rnnops.bench.kernel_profile summarize /tmp/ncu/ncu-*.csv --out "$OUT/kernels.md"
    tar -cJf "$OUT/ncu-logs.tar.xz" -C /tmp/ncu .
  else
    section bench
    # the bench starts no case after its budget (check mode: until 405 s, leaving the A/B checks
    # below their time; tune mode: 520 s), its op families taking turns; results.json holds every
    # finished case even if the timeout has to kill it mid-case
    [ "$MODE" = tune ] && end=520 || end=405
    budget=$((end - $(date +%s) + START))
    [ "$budget" -lt 20 ] && budget=20  # (`timeout 0` would mean no limit at all)
    # shellcheck disable=SC2086  # BENCH_OPS is a list of op families, one word each
    limit $((budget + 60)) python -m rnnops bench --quick --peers --profile --budget-s "$budget" --out "$OUT" \
      ${BENCH_OPS:+--ops $BENCH_OPS} ${BENCH_CASES:+--cases "$BENCH_CASES"} \
      ${earlier[0]:+--peer-choices-from "${earlier[@]}" --stalest-first "${earlier[@]}"}
  fi

  if [ "$MODE" = check ] || [ "$MODE" = ab ]; then
    section "A/B: the shipped configuration against candidate changes (nothing stored)"
    # ab SHARE OP ARGS...: `autotune --ops OP ARGS` (an A/B check with --try) until the shares so far
    # (percent) of the A/B checks' time, from here until 569 s after the start, are spent (one that
    # ends early leaves its time to the next), measuring nothing in its last 10 s; skipped with under
    # 20 s left. (Fixed ends gave the first check 60 s and each other 15 s after the check-mode bench
    # of 2026-11-28, too few for a second shape; `ab` mode gives them about 520 s)
    ab_start=$(date +%s)
    ab_window=$(seconds_until 569)
    ab_shares=0
    ab() {
      local share=$1 op=$2 left
      shift 2
      ab_shares=$((ab_shares + share))
      left=$((ab_start + ab_window * ab_shares / 100 - $(date +%s)))
      [ "$left" -gt 20 ] && limit "$left" python -m rnnops autotune --ops "$op" --budget-s $((left - 10)) "$@"
    }
    # (in the order of what they decide: a bench that overruns its budget leaves the last ones less)
    # First what decides a change. The delta rule's state walks and dq/dk: at f0d91df (2026-11-28)
    # the GVA gated bucket (32 value heads on 16 q / k heads, B8 T4096) timed 64 state columns both
    # ways at 1.09x of 32 (6.52 against 7.09 ms f+b; forward alone 1.04x, forward at three stages
    # 1.03x) and its dq/dk capped for three at 0.79x, 8 warps at 64-wide V tiles capped for two at
    # 0.82x (retired). The H200's GVA entry walks 64 columns both ways since; here against 32, with
    # three stages each way (fla's own stored choices, 4e23ac8: forward 64 columns at 3 stages
    # ungated, 4 gated; backward 64 at 3 ungated, 32 at 2 gated), and 64 both ways for the
    # ungated-heads gated bucket. Then the plain bucket (its forward walks 64 columns since
    # c34bbff's A/B, 1.04x), never reached since: 64 columns backward too, and its dq/dk (176
    # registers, two programs an SM since its partial dk is stored in k's dtype) capped for three
    # (168, 12 B spilled)
    ab 25 delta_rule \
      --shapes "B=8,T=4096,H=32,K=128,V=128,gated=1,Hk=16" "B=8,T=4096,H=16,K=128,V=128,gated=1" \
      "B=8,T=4096,H=16,K=128,V=128,gated=0" \
      --try '{"state_block_v": 32, "state_backward_block_v": 32}' '{"state_backward_num_stages": 3}' \
      '{"state_num_stages": 3}' '{"state_block_v": 64, "state_backward_block_v": 64}' \
      '{"dqk_programs_per_sm": 3}'
    # The scalar decay's dq/dk kernel (1.128 of its 2.35 ms f+b at c34bbff: a chain of dependent
    # loads and products a program, so programs an SM set its time): at f0d91df 64-wide V tiles
    # with its registers capped for two programs an SM (128, nothing spilled) took 1.786 ms f+b
    # against 2.164 (1.21x: dq/dk 1.129 -> 0.647 ms; the H200 ships it from 512 Ki tokens since),
    # 4 warps at the former 128-wide tiles 1.874 (1.15x: dq/dk 0.590, 219 registers, two an SM),
    # 64-wide V alone 1.03x, capped at 128-wide tiles 0.85x (it spills), 32-wide K 0.69x, the fused
    # forward at 8 warps and the state walks at one stage or 8 warps 0.99x (retired). Here: the
    # former entry, 4 warps at either tile. GLA's (8 warps, 144 registers since it stores dg in g's
    # dtype, one an SM), never reached: capped for two (128, nothing spilled), at 32-wide K tiles
    # (78 uncapped, three an SM), at 4 warps, and its chunk kernels at two stages (the factored
    # intra-chunk scores 224 -> 160 registers, two programs an SM -> three; Triton 3.6).
    # (GLA was 1.40x / 1.70x of fla's chunk_gla fwd / f+b at c34bbff; the scalar decay's forward
    # 0.59x of chunk_simple_gla's, its backward uncompared: fla refuses it on Triton 3.6 on Hopper)
    ab 25 linear_attn \
      --shapes "B=8,T=4096,H=16,K=128,V=128,gate=scalar" "B=8,T=4096,H=16,K=128,V=128,gate=per-key" \
      --try '{"block_v": 128, "dqk_programs_per_sm": 1}' '{"num_warps": 4}' \
      '{"num_warps": 4, "block_v": 128, "dqk_programs_per_sm": 1}' '{"dqk_programs_per_sm": 2}' \
      '{"block_k": 32}' '{"num_stages": 2}'
    # Mamba-1 at batch 1 (B1 T8192 Dm2048 N16): at f0d91df the CUDA scan took 1.20 / 4.27 ms fwd / f+b
    # against mamba_ssm's 0.347 / 1.82 (its 64 blocks of 32 channels each walked all 8192 steps,
    # half the H200's SMs idle); since then it splits each sequence into segments (LOCAL passes,
    # their composition, the main kernels per segment: 512 blocks at 8), and the Hopper entries at
    # batch 1 take 8 segments at 4 warps x 8 steps (the batch-8 tile), untimed. Here against one
    # segment (and the former 8-warp entry), 4 and 16; the Triton scan's (8 segments, 64-step
    # chunks, 1.22x of 32 on the H200) against 16 segments too
    ab 12 selective_scan \
      --shapes "B=1,T=8192,Dm=2048,N=16" --try '{"segments": 1}' '{"segments": 1, "warps": 8}' \
      '{"segments": 4}' '{"segments": 16}'
    # The cells: the H200's LSTM H12 D64 entries chosen by the A/B at 4e23ac8 (Triton at two stages,
    # CUDA in tensor-core fragments both ways) timed at f0d91df by the bench at 5.29 and 6.04 ms f+b
    # (the A/B's 5.35 and 6.09; retired here). The GRU at H12 D64, whose entries take neither
    # (untimed), against them; and the LSTM at H24 D32, whose Triton forward took 1.85 ms at f0d91df
    # against FlashRNN triton_fused's 1.51 (0.82x; at H48 D16 1.10x, H12 D64 1.01x): its entry runs a
    # 16 x 32 tile at 8 warps, here at 4 and 2. (Retired after 4e23ac8, the CUDA cells at H12 D64 /
    # H1 D768: their pointwise inputs read from global memory each step 0.66x / 0.93x, unpadded
    # product tiles 0.72x / 0.64x, the 768-wide head's gate gradients one chunk a round 0.86x, the
    # 64-wide head on four 16-unit blocks 1.09x of the sliced kernels, the forward alone in
    # fragments 1.06x)
    ab 10 rnn \
      --shapes "cell=gru,B=16,T=1024,H=12,D=64" "cell=lstm,B=16,T=1024,H=24,D=32" \
      --try '{"num_stages": 2}' '{"forward_fragments": 1, "backward_fragments": 1}' '{"num_warps": 4}' \
      '{"num_warps": 2}' '{"num_warps": 4, "backward_num_warps": 4}'
    # ungated linear attention at 1 Mi tokens (B8 T8192 H16): the H200's entry there is the former
    # one (two-pass forward at 8 warps), where 512 Ki tokens ships the fused forward with 4-warp
    # chunk kernels since the A/B at 4e23ac8 (1.25x f+b; f0d91df timed the former there at 0.94x
    # of it), as the H100 does from 512 Ki tokens (1.39x there, 2026-11-26)
    ab 8 linear_attn \
      --shapes "B=8,T=8192,H=16,K=128,V=128,gate=none" --try '{"fused_forward": 1, "num_warps": 4}'
    # the gated DeltaProduct's forward, 0.91x of fla's on the H200 at 76b5d92 and 4e23ac8, by kernel:
    # our state walk 0.284 ms against fla's 0.195 (its 64 state columns, one wave of walks; ours 32,
    # two waves) and our output kernel 0.249 against 0.163; since then the output kernel takes
    # chunks of 64 tokens (query tiles of 64 rows on wgmma, where 32 were on mma.sync) and the walk
    # stores a state a token chunk (half of them: 134 MB fewer written and read), untimed
    # (state_block_v: the forward walk's columns alone; then 32-wide K chunk tiles: since its dG
    # leaves out the pairs of a token's own steps (TOKEN_PAIRS, two more dots), the shipped 64-wide
    # tiles' dq/dk spills 80 B, the 32-wide none (244 registers; Triton 3.6). Its UT inverse is the
    # delta rule's: that A/B tries its warps)
    ab 8 delta_product \
      --shapes "B=8,T=2048,H=16,K=128,V=128,gated=1,num_householder=2" --try '{"state_block_v": 64}' \
      '{"block_k": 32}'
    # Mamba-2's SSD (80 value heads on one q / k head): at f0d91df its dq/dk kernel summing dq and dk
    # over all 80 value heads at 32-wide V tiles (group_heads 80, 255 registers, no spill with Triton
    # 3.6) took 3.44 ms f+b against one head a program at 64-wide tiles 3.97 (1.15x; 16 heads
    # 1.13x, 16 at 32-wide K tiles 1.03x, 32-wide V alone 0.98x): shipped on the H200 since. Here
    # the summed heads at 32-wide K tiles and the whole 64-wide V tile (185 and 255 registers)
    ab 12 linear_attn \
      --shapes "B=8,T=2048,H=80,K=128,V=64,gate=scalar,Hk=1" --try '{"block_v": 64, "block_k": 32}' \
      '{"block_v": 64}' '{"group_heads": 16}'
  fi

  section "compile cache for the next run"
  # the device returns at most 8 files from $OUT: report.html embeds the plots, so they go
  rm -f "$OUT"/*.png
  left=$(seconds_until 592)
  limit $((left > 10 ? left : 10)) python -m rnnops.bench.compile_cache pack "$OUT/compile-cache.tar.xz" \
    --since "$START" --label "$gpu"
  rm -f "$OUT"/*.tmp  # a pack stopped by its timeout
} 2>&1 | tee "$LOG"

echo
if [ "$MODE" = profile ]; then
  echo "commit with: cp \$files_at/kernels.md bench/results/${gpu}-$(date +%F)-kernels.md"
elif [ "$MODE" = ab ]; then
  echo "the A/B tables are the record (suite.log): log them in bench/results/README.md"
else
  echo "commit with: cp \$files_at/results.json bench/results/${gpu}-$(date +%F).json  (its peer_autotune serves the next run)"
fi
echo "keep for the next run (not committed): cp \$files_at/compile-cache.tar.xz .whl/"
if [ "$MODE" = tune ]; then
  echo "and merge \$files_at/tuned.json's entries (measured choices) into autotune/defaults/"
fi
