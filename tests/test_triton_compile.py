"""The Triton kernels compiled for an H100 (sm_90) and an A100 (sm_80) without a GPU: every kernel
the standard calls launch compiles, fits the GPU's shared memory per block, and, for half inputs
(bfloat16), spills no registers, with each kernel's DEFAULT_CONFIG (sm_90) and with the configurations
shipped for the GPU (rnnops.triton_backend.compile_check; ptxas' report). Triton's interpreter,
which runs the numerical tests on CPUs, checks none of this.

float32 inputs (tf32x3 dot products) still spill in the delta rule's state kernels and UT backward:
those are checked to compile and fit, not for spills (the UT inverse is, by its own test).

"Without spills" allows SPILL_TOLERANCE bytes per kernel: ptxas sometimes keeps a kernel at 128
registers for occupancy and moves a few bytes to local memory, and which kernels it does that to
changes between its versions (Triton 3.6 bundles ptxas 12.x, 3.9 ptxas 13.x; seen: 4-24 B in the
float32 cells and GLA's sub-chunk kernels on one and not the other). SPILL_ALLOWANCES names the
kernels allowed more: the gated DeltaProduct's dq/dk at the H100's measured tiles (64 x 128 at 4
warps, 255 registers, its V loop one iteration) stores 52 B since its per-token q and do take
offsets of their own and q a mask (28 B when the host interleaved them with zeros; 32 x 128
tiles spill nothing, unmeasured), and 72 B since its dG leaves each token's own pair out (added
to dq and dk after: an accuracy fix), which took the gated delta rule's dq/dk from 16 to 44 B;
both with Triton 3.9's ptxas. With Triton 3.6's, the GPU machine's, the same change took them
from 20 and 32 B to 20 and 4 B. The gated DeltaProduct's dG also leaves out the pairs of a
token's own steps (TOKEN_PAIRS, an accuracy fix: two more dots with masked dA): 60 -> 92 B (3.9),
36 -> 80 B (3.6; 276 B before its dW was stored as soon as whole). Its partial dk in k's dtype
(the delta rule's dq/dk wrote it in float32): 92 -> 128 B (3.9), 80 -> 52 B (3.6; the plain
delta rule's 241 -> 176 registers, the gated one's 12 B -> none). Running out of registers
spills hundreds of bytes to tens of kilobytes, which these tests exist to catch.
"""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rnnops import triton_backend
from rnnops._ptxas import lane_divergent_sums, parse_log, tensor_core_path
from rnnops.autotune import hardware, kernels

pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")

H100 = hardware.named("H100")
SPILL_TOLERANCE = 32  # bytes stored or loaded per kernel (module docstring)
SPILL_ALLOWANCES = {("DeltaProduct", "dqk_kernel"): 128,  # (case containing, kernel): bytes (module docstring)
                    ("gated delta rule", "dqk_kernel"): 48}
COMPILING_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # kernels must be compiled
GROUPS = {"linear attention": "linear attention|scalar decay|GLA|SSD", "delta rule": "delta rule|DeltaProduct",
          "selective scan": "Mamba-1|selective_state_update", "cells": "lstm|gru|elman", "steps": "_step"}


def compile_reports(case: str, dtypes: tuple[str, ...], gpu: str | None = None, arch: int = 90,
                    loops: bool = False) -> list[dict]:
    """compile_check's rows, run in a process without TRITON_INTERPRET."""
    command = [sys.executable, "-m", "rnnops.triton_backend.compile_check", "--arch", str(arch), "--json", "--case",
               case] + (["--loops"] if loops else [])
    command += [arg for dtype in dtypes for arg in ("--dtype", dtype)] + (["--gpu", gpu] if gpu else [])
    result = subprocess.run(command, capture_output=True, text=True, env=COMPILING_ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout)
    assert rows, f"no kernel launched for {case!r}"
    return rows


def compiled_script_json(script: str, env: dict = COMPILING_ENV):
    """What ``script`` printed as JSON, run by this Python in a process without TRITON_INTERPRET
    (kernels must be compiled) and with ``env``; its stderr's end if it fails."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def config_report_rows(op: str, shape: dict, dtype: str, config: dict,
                       kernels: frozenset[str] | None = None, gpu: str | None = None) -> list[dict]:
    """compile_check.config_reports' rows for ``op`` at ``shape`` with ``config`` (sm_90; only the
    ``kernels`` named, if given; with ``gpu``'s limits where named), run in a process without
    TRITON_INTERPRET."""
    script = ("import json, torch\n"
              "from dataclasses import asdict\n"
              "from rnnops.triton_backend.compile_check import config_reports\n"
              f"rows = config_reports({op!r}, {shape!r}, torch.{dtype}, {config!r}, 90, {kernels!r}, {gpu!r})\n"
              "print(json.dumps([asdict(r) for r in rows]))\n")
    return compiled_script_json(script)


def describe(row: dict) -> str:
    """A report row in words (config_report_rows' rows name no dtype or case)."""
    return (f"{row.get('dtype', '')} {row.get('case', '')}: {row['name']} {row['registers']} registers, "
            f"{row['spill_stores']}/{row['spill_loads']} bytes spilled, {row['shared_bytes']} bytes shared")


def spill_allowance(row: dict) -> int:
    """The bytes of spills tolerated in this kernel: SPILL_TOLERANCE, or its SPILL_ALLOWANCES entry."""
    return max([SPILL_TOLERANCE] + [allowed for (case, name), allowed in SPILL_ALLOWANCES.items()
                                    if case in row["case"] and name == row["name"]])


def assert_fits(rows: list[dict], spill_free: bool, gpu=H100) -> None:
    too_big = [describe(r) for r in rows if r["shared_bytes"] > gpu.shared_memory_per_block]
    assert not too_big, f"over the {gpu.name}'s {gpu.shared_memory_per_block} bytes of shared memory: {too_big}"
    if spill_free:
        spilled = [describe(r) for r in rows if max(r["spill_stores"], r["spill_loads"]) > spill_allowance(r)]
        assert not spilled, f"spills registers: {spilled}"


def assert_lanes_agree(rows: list[dict]) -> None:
    """No sum across lanes leaves its lanes with different copies (rnnops._ptxas.lane_divergent_sums):
    the Triton scan's backward stored its dB and dC sums over channels that way, and 8 lanes' copies
    of each raced in shared memory (compute-sanitizer racecheck on an H200, 2026-11-27)."""
    divergent = [f"{describe(r)}: {r['lane_divergent_sums']}" for r in rows if r["lane_divergent_sums"]]
    assert not divergent, f"sums across lanes whose lanes disagree: {divergent}"


@pytest.mark.parametrize("group", GROUPS)
def test_half_kernels_compile_without_spills_by_default(group):
    """bfloat16 stands for both half types: float16 kernels differ only in their conversion
    instructions (same tiles, same registers), and compiling both doubled this test's minutes."""
    rows = compile_reports(GROUPS[group], ("bfloat16",))
    assert_fits(rows, spill_free=True)
    assert_lanes_agree(rows)


# kernels of the linear family without warpgroup tensor-core products on an H100: no dot products
# (cumsum) or GLA's 16 x 16 sub-chunk blocks (a warpgroup product needs 64 rows; the launches of
# the same kernels for chunks factored whole do use them). DeltaProduct's output kernel is not
# among them: its query tile is a token chunk (64 rows), not a row-chunk's 64 / n_h queries
WARP_LEVEL = re.compile("cumsum|intra_scores|intra_dqk")


# SASS instructions per exponential in the scan kernels' per-step loops (about one exponential per
# (step, channel, state element); measured 17 forward, 41 backward at the H100's configuration
# with Triton 3.6 and 3.9 (the backward 28 with 4-step sub-blocks, whose loop also held the
# recomputation's exponentials: fewer instructions a step since, 446 against 498), where
# tl.associative_scan over chunk tiles took 100 and 105: shuffles and shared memory)
SCAN_INSTRUCTIONS_PER_EXPONENTIAL = {"scan_fwd_kernel": 30, "scan_bwd_kernel": 50}
# with a channel's state elements in one thread, the forward's only shuffles sum <x, C> over the
# 32 / block_d lanes of a block narrower than a warp: log2(32 / block_d) a step against block_d N
# / 32 + 2 exponentials (16 / 48 an 8-step iteration at block_d 8, 8 / 80 at 16). State elements
# across lanes (Triton 3.6 with the scan's former (Dm, N) state layout) took 128 / 96 at
# block_d 8, and 2.7 times the instructions
SCAN_FORWARD_SHUFFLES_PER_EXPONENTIAL = 0.5


@pytest.mark.parametrize("group", ["linear attention", "delta rule", "selective scan", "cells"])
def test_h100_shipped_configs_compile_without_spills(group):
    """And the linear family's matrix kernels use Hopper's warpgroup products (wgmma), not the
    slower mma.sync, which a tile of fewer than 64 rows or fewer than 4 warps falls back to; the
    scan's loops stay within their instruction budgets (an issue-bound kernel's time)."""
    rows = compile_reports(GROUPS[group], ("bfloat16",), gpu="H100", loops=group == "selective scan")
    assert_fits(rows, spill_free=True)
    assert_lanes_agree(rows)
    if group in ("linear attention", "delta rule"):
        slower = [f"{describe(r)}: {r['tensor_cores']}" for r in rows
                  if r["tensor_cores"] != "wgmma" and not WARP_LEVEL.search(r["name"])]
        assert not slower, f"not on warpgroup tensor cores: {slower}"
    if group == "selective scan":
        for r in rows:
            if r["name"] in SCAN_INSTRUCTIONS_PER_EXPONENTIAL:
                assert r["loop_exponentials"], f"{r['name']}: no per-step loop with exponentials"
                per_exponential = r["loop_instructions"] / r["loop_exponentials"]
                assert per_exponential <= SCAN_INSTRUCTIONS_PER_EXPONENTIAL[r["name"]], describe(r)
                if r["name"] == "scan_fwd_kernel":
                    shuffles = r["loop_shuffles"] / r["loop_exponentials"]
                    assert shuffles <= SCAN_FORWARD_SHUFFLES_PER_EXPONENTIAL, f"{describe(r)}: {r['loop_shuffles']} shuffles"


@pytest.mark.parametrize("group", ["linear attention", "selective scan", "cells"])
def test_a100_shipped_configs_compile_without_spills(group):
    """The delta rule is left out: its UT backward spills on sm_80 whatever the tiles (its BT x BT
    float32 matrices), so --compile-check ships the configuration that spills least there."""
    assert_fits(compile_reports(GROUPS[group], ("bfloat16",), gpu="A100", arch=80), spill_free=True,
                gpu=hardware.named("A100"))


# float32's cases: each family's extremes, not the variants between them (the scalar decay without
# grouped heads, the gated delta rule with one step a token, whose kernels are the SSD's and the
# gated DeltaProduct's at other constexprs): compiling them took a tenth of the CPU tests' time
FLOAT32_GROUPS = dict(GROUPS, **{"linear attention": "linear attention|GLA|SSD",
                                 "delta rule": "^delta rule|DeltaProduct"})


@pytest.mark.parametrize("group", FLOAT32_GROUPS)
def test_float32_kernels_compile_and_fit(group):
    """Spill-free too, except the delta rule's state and UT kernels (0.7-2 KB: tf32x3 splits every
    operand in two, and the state kernels hold full-K tiles)."""
    rows = compile_reports(FLOAT32_GROUPS[group], ("float32",))
    assert_lanes_agree(rows)
    spilling = re.compile("delta rule|DeltaProduct")
    assert_fits([r for r in rows if spilling.search(r["case"])], spill_free=False)
    assert_fits([r for r in rows if not spilling.search(r["case"])], spill_free=True)


def test_float32_delta_rule_at_head_dim_16_keeps_chunk_products_on_tensor_cores():
    """16-wide heads take "ieee" dots, but the UT inverse's and dL's chunk x chunk x chunk products
    have no head-dim tile: in "ieee" they ran on CUDA cores with 8-11 KB of stack a thread
    (sm_90, Triton 3.6 and 3.9) and their launch failed with out of memory on an H100. A few KB
    stay: tf32x3's split operands, as at K = 128."""
    shape = {"B": 2, "T": 256, "H": 2, "K": 16, "V": 32, "gated": True, "num_householder": 1}
    chunk_products = frozenset({"ut_inverse_kernel", "ut_bwd_kernel"})
    rows = config_report_rows("delta_rule", shape, "float32", kernels.find("delta_rule", "triton").default(),
                              chunk_products)
    stacks = {row["name"]: row["stack_bytes"] for row in rows}
    assert stacks.keys() == chunk_products
    assert max(stacks.values()) < 4096, stacks


def test_ut_inverse_latency_chain_in_sass():
    """The UT inverse's forward substitution on the chunk's 16 x 16 diagonal blocks
    (_unit_lower_inverse), 15 dependent steps, takes a column of L times a finished row each step:
    its sums stay within the warps (no shared memory, no block barrier: sm_90, 4 warps, the default
    configurations at one pipeline stage, as the H100's and H200's entries) where a row at a time
    took 5-6 barriers a step for its layout conversions (Triton 3.6 and 3.9), and float32 spills
    nothing (1.1-1.8 KB did). Checked in its SASS (bfloat16 gated and not, float32 gated): unrolled,
    so every loop left multiplies on tensor cores (the k k^T product's; ungated, W's and U's), and
    the barriers are their staging's (10 gated, 21 ungated; the left-looking steps added 75); k's
    tiles load with cp.async (LDGSTS: _gram's own two stages) though the launch takes one."""
    script = ("import dataclasses, json, torch\n"
              "from rnnops import _sass\n"
              "from rnnops.triton_backend import delta_rule\n"
              "from rnnops.triton_backend.compile_check import compile_launch, config_launches\n"
              "rows = []\n"
              "for dtype, gated in ((torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)):\n"
              "    config = delta_rule.default_config(dtype, delta_rule.DEFAULT_CONFIG,\n"
              "                                       delta_rule.FLOAT32_DEFAULT_CONFIG)\n"
              "    config = dataclasses.asdict(dataclasses.replace(config, num_stages=1))\n"
              "    shape = {'K': 128, 'V': 128, 'gated': gated, 'num_householder': 1}\n"
              "    (launch,) = [launch for launch in config_launches('delta_rule', shape, dtype, config)\n"
              "                 if launch.kernel.__name__ == 'ut_inverse_kernel']\n"
              "    compiled, report = compile_launch(launch, 90)\n"
              "    cubin = compiled.asm['cubin']\n"
              "    opcodes = _sass.opcodes(cubin)\n"
              "    rows.append({'case': f'{dtype} gated={gated}', 'spill': max(report.spill_stores, report.spill_loads),\n"
              "                 'barriers': opcodes['BAR'], 'async_copies': opcodes['LDGSTS'],\n"
              "                 'loops': [loop.opcodes for loop in _sass.loops(cubin)]})\n"
              "print(json.dumps(rows))\n")
    rows = compiled_script_json(script)
    assert len(rows) == 3
    for row in rows:
        assert all(loop.get("HGMMA") for loop in row["loops"]), row
        assert row["barriers"] <= 32, row
        assert row["async_copies"], row
        assert row["spill"] <= SPILL_TOLERANCE, row


def test_scan_in_segments_compiles_without_spills():
    """The segment passes (forward: a segment's end from zero, the walk over segments, the outputs
    from their entering states; backward: the adjoint alone, the reverse walk, the gradients),
    which the standard calls' single-segment shipped configurations never launch."""
    config = {"block_d": 16, "chunk": 32, "forward_block_d": 16, "segments": 4}
    rows = config_report_rows("selective_scan", {"Dm": 2048, "N": 16}, "bfloat16", config)
    names = [row["name"] for row in rows]
    assert names.count("scan_fwd_kernel") == 2 and names.count("scan_segment_states_kernel") == 2, names
    assert "scan_bwd_local_kernel" in names and "scan_bwd_kernel" in names, names
    assert not [row for row in rows if max(row["spill_stores"], row["spill_loads"]) > SPILL_TOLERANCE], rows


@pytest.mark.parametrize("gate,warps", [("none", 4), ("scalar", 8)])
def test_fused_linear_attention_forward_compiles_on_warpgroup_tensor_cores(gate, warps):
    """fused_fwd_kernel (LinearAttnConfig.fused_forward) at K = V = 128, bf16, the state's 128 x 64
    tile in registers: on wgmma, no spills (sm_90; the scalar decay spills 44 B at 4 warps)."""
    config = dict(kernels.find("linear_attn", "triton").default(), fused_forward=1, state_num_warps=warps)
    rows = config_report_rows("linear_attn", {"K": 128, "V": 128, "gate": gate}, "bfloat16", config)
    fused = [row for row in rows if row["name"] == "fused_fwd_kernel"]
    # the forward launches it instead of output_kernel (the backward still recomputes the states)
    assert len(fused) == 1 and "output_kernel" not in [row["name"] for row in rows], rows
    assert fused[0]["tensor_cores"] == "wgmma", describe(fused[0])
    assert max(fused[0]["spill_stores"], fused[0]["spill_loads"]) <= SPILL_TOLERANCE, describe(fused[0])


def test_dqk_register_cap_reaches_ptxas():
    """dqk_programs_per_sm at the H200's tiles (8 warps): ptxas holds the dq/dk kernel to
    65536 / (programs x 256 threads) registers a thread. The scalar decay's former 64 x 128 tiles
    take 230 uncapped (Triton 3.6; one program an SM): capped for two, 128 or fewer, spilling (what
    a cap the launch dropped could not do). Its shipped entry (64-wide V tiles capped for two since
    the A/B at f0d91df: 135 uncapped; 3.9: nothing either) spills nothing with Triton 3.6 (the GPU
    machine's), nor GLA's shipped tiles capped for two (144 uncapped; 3.9: 48 B)."""
    script = ("import json, torch\n"
              "from rnnops.autotune.cache import shipped_defaults\n"
              "from rnnops.triton_backend.compile_check import config_reports\n"
              "rows = []\n"
              "for gate, change in (('scalar', {'block_v': 128}), ('scalar', {}),\n"
              "                     ('per-key', {'dqk_programs_per_sm': 2})):\n"
              "    config = shipped_defaults('H200')[f'linear_attn|triton|bfloat16:K128:V128:{gate}:tokens~524288']\n"
              "    (report,) = config_reports('linear_attn', {'K': 128, 'V': 128, 'gate': gate}, torch.bfloat16,\n"
              "                               dict(config, **change), 90, frozenset({'dqk_kernel'}), 'H200')\n"
              "    rows.append((report.threads, report.registers, report.spill_stores + report.spill_loads))\n"
              "print(json.dumps(rows))\n")
    held, scalar, per_key = compiled_script_json(script)
    assert held[0] == 256 and held[1] <= 128 and held[2] > 0, held
    assert scalar[0] == 256 and scalar[1] <= 128 and scalar[2] == 0, scalar
    assert per_key[0] == 256 and per_key[1] <= 128 and per_key[2] <= 64, per_key  # (Triton 3.9: 48 B; 3.6: none)


def test_fused_delta_rule_forward_compiles_on_warpgroup_tensor_cores():
    """The delta rule's fused forward (DeltaRuleConfig.fused_forward: linear attention's
    fused_fwd_kernel with V_new = U - W S_in in the walk) at K = V = 128, bf16, gated (the larger
    kernel), at the tiles the GPU suite's A/B tries (64 state columns, 8 warps): on wgmma, no
    spills (sm_90; Triton 3.6: 255 registers, 195 ungated, 131 KB of shared memory, one program an SM)."""
    config = dict(kernels.find("delta_rule", "triton").default(), fused_forward=1, state_block_v=64,
                  state_num_warps=8)
    rows = config_report_rows("delta_rule", {"K": 128, "V": 128, "gated": True, "num_householder": 1}, "bfloat16",
                              config)
    names = [row["name"] for row in rows]
    # the forward launches it instead of states_fwd_kernel and output_kernel; the backward still
    # recomputes the states (states_fwd_kernel once)
    assert names.count("fused_fwd_kernel") == 1 and "output_kernel" not in names, names
    assert names.count("states_fwd_kernel") == 1, names
    fused = next(row for row in rows if row["name"] == "fused_fwd_kernel")
    assert fused["tensor_cores"] == "wgmma", describe(fused)
    assert max(fused["spill_stores"], fused["spill_loads"]) <= SPILL_TOLERANCE, describe(fused)


def test_rnn_backward_takes_its_own_warps():
    """RNNConfig.backward_num_warps reaches the backward kernel's launch and num_warps the
    forward's (the H100's LSTM A/B: 4 warps in both 1.10x faster than 8, f+b)."""
    config = dict(kernels.find("rnn", "triton").default(), num_warps=8, backward_num_warps=4)
    rows = config_report_rows("rnn", {"cell": "lstm", "H": 2, "D": 64, "B": 16, "T": 8}, "bfloat16", config)
    threads = {row["name"]: row["threads"] for row in rows}
    assert threads == {"rnn_fwd_kernel": 256, "rnn_bwd_kernel": 128}, threads


def test_rnn_forward_pipelines_its_time_loop_at_two_stages():
    """RNNConfig.num_stages reaches the forward's time loop (STAGES, a tl.range stage count): at two,
    Triton copies a step's inputs into shared memory a step ahead, which takes a stage's buffer
    (the launch's num_stages alone had left that loop unpipelined: the same shared memory at one
    and two stages); the backward's loop pipelines either way."""
    shape = {"cell": "lstm", "H": 2, "D": 64, "B": 16, "T": 8}
    shared = {}
    for stages in (1, 2):
        config = dict(kernels.find("rnn", "triton").default(), num_stages=stages)
        shared[stages] = {row["name"]: row["shared_bytes"] for row in config_report_rows("rnn", shape, "bfloat16",
                                                                                           config)}
    assert shared[2]["rnn_fwd_kernel"] > shared[1]["rnn_fwd_kernel"], shared
    assert shared[2]["rnn_bwd_kernel"] > shared[1]["rnn_bwd_kernel"], shared


def test_autotune_explain_shows_what_ptxas_reports():
    result = subprocess.run([sys.executable, "-m", "rnnops", "autotune", "--explain", "selective_scan",
                             "B=8,T=2048,Dm=2048,N=16", "--gpu", "H100", "--compile-check"],
                            capture_output=True, text=True, env=COMPILING_ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "triton.selective_scan on H100" in result.stdout
    assert result.stdout.count("compiled for sm_90: up to") == 5, result.stdout
    assert result.stdout.count("programs per SM (limit; tensor cores): scan_fwd") == 5, result.stdout
    assert f"B shared of {H100.shared_memory_per_block}" in result.stdout


def test_ptxas_report_is_parsed():
    log = """ptxas info    : Compiling entry function 'dqk_kernel' for 'sm_90a'
ptxas info    : Function properties for dqk_kernel
    80 bytes stack frame, 72 bytes spill stores, 68 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 80 bytes cumulative stack size
ptxas info    : Function properties for _Z4scanILi4EEvv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
"""
    first, second = parse_log(log)
    assert (first.name, first.registers, first.spill_stores, first.spill_loads, first.stack_bytes) == \
        ("dqk_kernel", 255, 72, 68, 80)
    assert (second.name, second.registers, second.spill_stores, second.shared_bytes) == ("_Z4scanILi4EEvv", 40, 0, 1024)


def test_tensor_core_path_is_read_from_ptx():
    assert tensor_core_path("\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1, %r2}, %rd3, %rd4;") == "wgmma"
    assert tensor_core_path("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};") == "mma"
    assert tensor_core_path("\tfma.rn.f32 %f1, %f2, %f3, %f4;") == "none"


def test_lane_divergent_sums_are_read_from_ptx():
    """A butterfly step that fuses the lane's own product counts, fused by Triton (an FMA with the
    shuffled value as addend) or left for ptxas to fuse (an add of a plain mul.f32); one adding
    rounded values (a product rounded by an FMA with a zero addend, as _channel_sum does) does not."""
    shuffle = "\tmul.f32 %r1, %r2, %r3;\n\tshfl.sync.bfly.b32 %r4, %r1, 4, 31, -1;\n"
    assert lane_divergent_sums(shuffle + "\tfma.rn.f32 %r5, %r2, %r3, %r4;\n") == 1
    assert lane_divergent_sums(shuffle + "\tadd.f32 %r5, %r1, %r4;\n") == 1
    rounded = "\tfma.rn.f32 %r1, %r2, %r3, 0f00000000;\n\tshfl.sync.bfly.b32 %r4, %r1, 4, 31, -1;\n"
    assert lane_divergent_sums(rounded + "\tadd.f32 %r5, %r1, %r4;\n") == 0


def test_a_checked_specialisation_is_read_back_not_compiled_again(tmp_path):
    """compile_check keeps each specialisation's report in Triton's cache directory: a second
    check of the same kernels reads them (Triton's compiler may not run) and reports what the
    first did."""
    script = ("import json, sys, triton\n"
              "from rnnops.triton_backend.compile_check import check\n"
              "first = check(90, case='linear_attn_step')\n"
              "triton.compile = lambda *args, **kwargs: sys.exit('compiled again')\n"
              "print(json.dumps([first, check(90, case='linear_attn_step')]))\n")
    first, second = compiled_script_json(script, dict(COMPILING_ENV, TRITON_CACHE_DIR=str(tmp_path)))
    assert first and first == second
    assert len(list((tmp_path / "rnnops-ptxas").glob("*.json"))) == len({r["name"] + r["dtype"] for r in first})


def test_every_launch_asks_for_fused_multiply_adds():
    """Every Triton launch goes through _common.launch, which passes enable_fp_fusion=True: Triton
    3.10 stops fusing products into adds unless a launch asks (3.9 warns of it), which would slow
    the recurrences and change the rounding the tests bound. A call of a subscript
    (``kernel[grid](...)``) anywhere else in the Triton backend is a launch that bypasses it."""
    package = Path(triton_backend.__file__).parent
    direct = []
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        launch = next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "launch"), None)
        allowed = {id(node) for node in ast.walk(launch)} if path.name == "_common.py" and launch else set()
        direct += [f"{path.name}:{node.lineno}" for node in ast.walk(tree)
                   if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and id(node) not in allowed]
    assert not direct, f"Triton launches outside _common.launch: {direct}"
