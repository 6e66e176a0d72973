"""The autotuner on the CPU: spaces for every offline GPU and kernel, solver against brute force,
CUDA configurations against nvcc, the cache's robustness, config look-ups, and the CLI."""
import dataclasses
import json
import multiprocessing
import operator
import os
import re
import time
import warnings

import pytest
import torch

from rnnops.autotune import cache, hardware, kernels, tuner
from rnnops.autotune.cache import TuneCache
from rnnops.autotune.space import Constraint, Space
from rnnops.cuda_backend import compile_check
from rnnops.cuda_backend import rnn as cuda_rnn
from rnnops.__main__ import main

GPUS = list(hardware.OFFLINE)
IDENTITY = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "driver": 13000, "torch": "x", "triton": "y",
            "rnnops": "z"}


def test_space_solves_unjoined_groups_of_variables_apart():
    """Variables no constraint joins are solved as separate groups and combined; the legal list
    keeps declaration order either way (here the groups interleave: {a, c} and {b})."""
    space = Space({"a": [1, 2, 4], "b": [3, 1], "c": [8, 2]},
                  (Constraint("a < c", ("a", "c"), lambda a, c: a < c), Constraint("b odd", ("b",), lambda b: b % 2)))
    assert [members for members, _ in space.components()] == [["a", "c"], ["b"]]
    assert space.legal() == sorted(space.brute_force(), key=operator.itemgetter("a", "b", "c"))
    assert [list(config) for config in space.legal()] == [["a", "b", "c"]] * 8


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("tunable", kernels.TUNABLES, ids=lambda t: t.name)
def test_spaces_are_legal_and_match_brute_force(gpu, tunable):
    hw = hardware.named(gpu)
    # one shape per space: the spaces depend on head dims, cell and variant, not on the sizes that
    # set the grid (the linear family's 27 standard shapes share one head shape)
    spaces = {tuple((k, v) for k, v in shape.items() if k not in ("B", "T", "H")): shape
              for shape in tuner.standard_shapes(tunable.op)}
    for index, shape in enumerate(spaces.values()):
        space = tunable.space(shape, torch.bfloat16, hw)
        legal = space.legal()
        # the documented gap: a 768-wide head whose smallest weight slice (16 units of every gate, with the
        # step's buffers) needs more shared memory than a block has (V100, L4, RTX 4090 for LSTM)
        too_wide = tunable.name == "cuda.rnn" and max(
            cuda_rnn.shared_bytes(shape["D"], shape["cell"], 16, 2, 64, 0, 1, 0)
        ) > hw.shared_memory_per_block
        assert bool(legal) != too_wide, (gpu, shape)
        # the same configurations, in the same order (sorted by value in declaration order), keys in that
        # order; against the brute force at one head shape a GPU, each shape on some GPU (filtering
        # the whole product of the domains at every shape took linear attention's check 6 s a GPU)
        if index == GPUS.index(gpu) % len(spaces):
            assert legal == sorted(space.brute_force(), key=operator.itemgetter(*space.variables))
        assert all(list(config) == list(space.variables) for config in legal)
        for config in legal:
            assert tunable.threads(config) <= hw.max_threads_per_block
            assert tunable.programs(config, shape) >= 1


def test_rank_puts_the_cheapest_first_and_counts_are_reported():
    hw = hardware.named("H100")
    tunable = kernels.find("linear_attn", "triton")
    shape = tuner.standard_shapes("linear_attn")[0]
    count, ranked = tuner.rank(tunable, shape, torch.bfloat16, hw)
    costs = [tunable.cost(c, shape, torch.bfloat16, hw) for c in ranked]
    assert count == len(ranked) and costs == sorted(costs)


@pytest.mark.skipif(compile_check.nvcc() is None, reason="needs nvcc")
@pytest.mark.parametrize("gpu,arch", [("A100", "sm_80"), ("H100", "sm_90a")])
def test_cuda_configs_the_model_accepts_compile_within_its_budget(gpu, arch):
    hw = hardware.named(gpu)
    scan_configs = kernels.find("selective_scan", "cuda").space({"N": 16}, torch.bfloat16, hw).legal()
    rnn_configs = kernels.find("rnn", "cuda").space({"D": 768, "cell": "lstm"}, torch.bfloat16, hw).legal()
    tiles = sorted({(c["warps"], c["items"], bool(c["stage_rows"])) for c in scan_configs})  # (any segments)
    instantiations = [compile_check.scan_kernel(p, "__nv_bfloat16", *tile) for tile in tiles for p in ("fwd", "bwd")]
    instantiations += [compile_check.rnn_kernel(p, "__nv_bfloat16", 0, u)
                       for u in sorted({c["units"] for c in rnn_configs}) for p in ("fwd", "bwd")]
    reports = compile_check.ptxas_reports(instantiations, arch)
    assert len(reports) == len(instantiations)
    threads = max([32 * c["warps"] for c in scan_configs] + [c["threads"] for c in rnn_configs])
    for report in reports:
        assert report.spill_stores == 0 and report.spill_loads == 0, report
        assert report.shared_bytes <= hw.shared_memory_per_block
    assert all(r.registers * 128 <= hw.registers_per_block for r in reports) and threads <= hw.max_threads_per_block


def _cache(tmp_path):
    return TuneCache(tmp_path / "device.json", IDENTITY)


def test_cache_round_trip(tmp_path):
    _cache(tmp_path).put({"op|triton|b": {"config": {"block_k": 32}, "seconds": 1.0}})
    fresh = _cache(tmp_path)
    assert fresh.get("op", "triton", "b")["config"] == {"block_k": 32}
    assert fresh.best_backend("op", "b") == "triton"
    fresh.put({"op|cuda|b": {"config": {"units": 16}, "seconds": 0.5}})
    assert fresh.best_backend("op", "b") == "cuda" and fresh.config_for("op|cuda|b") == {"units": 16}  # not stale
    assert _cache(tmp_path).best_backend("op", "b") == "cuda"


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "identity": {"gpu": "A100"}, "entries": {}}',
                                     '{"format": 99}', "", "[1, 2]"],
                         ids=["corrupt", "foreign-device", "wrong-version", "empty", "not-a-dict"])
def test_bad_cache_files_are_ignored_with_a_warning(tmp_path, content):
    (tmp_path / "device.json").write_text(content)
    with pytest.warns(RuntimeWarning, match="rnnops autotune cache"):
        assert _cache(tmp_path).entries == {}


def test_truncated_file_is_ignored(tmp_path):
    _cache(tmp_path).put({"op|triton|b": {"config": {"block_k": 32}, "seconds": 1.0}})
    path = tmp_path / "device.json"
    path.write_text(path.read_text()[:20])
    with pytest.warns(RuntimeWarning):
        assert _cache(tmp_path).get("op", "triton", "b") is None


def _writer(directory, worker):
    c = TuneCache(directory / "device.json", IDENTITY)
    for i in range(20):
        c.put({f"op|w{worker}|{i}": {"config": {"i": i}, "seconds": 1.0}})


def test_concurrent_writers_lose_nothing(tmp_path):
    processes = [multiprocessing.get_context("spawn").Process(target=_writer, args=(tmp_path, w)) for w in range(3)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
        assert p.exitcode == 0
    entries = _cache(tmp_path).entries
    assert len(entries) == 60 and json.loads((tmp_path / "device.json").read_text())["format"] == cache.FORMAT


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_directory_keeps_results_in_memory(tmp_path):
    tmp_path.chmod(0o500)
    try:
        c = _cache(tmp_path)
        with pytest.warns(RuntimeWarning, match="cannot be written"):
            c.put({"op|triton|b": {"config": {}, "seconds": 1.0}})
        assert c.get("op", "triton", "b") is not None
    finally:
        tmp_path.chmod(0o700)


def test_unwritable_cache_path_keeps_results_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    c = TuneCache(blocker / "sub" / "device.json", IDENTITY)  # a file where a directory should be
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        c.put({"op|triton|b": {"config": {}, "seconds": 1.0}})
    assert c.get("op", "triton", "b") is not None


def test_kernels_take_their_configuration_from_the_look_up(monkeypatch):
    from rnnops.triton_backend import linear_attn as triton_linear_attn

    seen = []
    original = triton_linear_attn.LinearAttnFunction.apply
    monkeypatch.setattr(triton_linear_attn.LinearAttnFunction, "apply",
                        lambda *args: seen.append(args[-1]) or original(*args))
    q, k, v = torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 32)
    shape = dict(B=1, T=20, H=2, K=16, V=32, gate="none")
    bucket = kernels.bucket("linear_attn", shape, torch.float32)
    import rnnops

    reference = rnnops.linear_attn(q, k, v, chunk_size=16, backend="reference")[0]
    with cache.override("linear_attn", "triton", bucket, {"block_v": 16, "num_warps": 2}):
        out = rnnops.linear_attn(q, k, v, chunk_size=16, backend="triton")[0]
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    assert seen[-1].block_v == 16 and seen[-1].num_warps == 2
    rnnops.linear_attn(q, k, v, chunk_size=16, backend="triton")
    assert seen[-1] == triton_linear_attn.FLOAT32_DEFAULT_CONFIG  # no entry on the CPU: float32's default
    rnnops.linear_attn(q.half(), k.half(), v.half(), chunk_size=16, backend="triton")
    assert seen[-1] == triton_linear_attn.DEFAULT_CONFIG


def test_shipped_defaults_are_legal_for_their_gpu():
    """Every shipped entry names the kernel's variables, lies in their domains and meets every
    constraint of its space on its GPU, for the standard shape its bucket came from (e.g. the
    Hopper rule that the delta rule's state kernels keep two stages)."""
    shapes = {(op, kernels.bucket(op, shape, torch.bfloat16)): shape
              for op in ("linear_attn", "delta_rule", "delta_product", "selective_scan", "rnn")
              for shape in tuner.standard_shapes(op)}
    for gpu in GPUS:
        defaults = cache.shipped_defaults({"H100": "NVIDIA H100 80GB HBM3"}.get(gpu, gpu))
        assert defaults, gpu
        hw = hardware.named(gpu)
        for k, config in defaults.items():
            op, backend, bucket = k.split("|")
            tunable = kernels.find(op, backend)
            assert set(config) == set(tunable.default())
            assert tunable.config(config) is not None
            space = tunable.space(shapes[op, bucket], torch.bfloat16, hw)
            assert all(config[name] in domain for name, domain in space.variables.items()), (gpu, k, config)
            broken = [c.name for c in space.constraints if not c.holds(config)]
            assert not broken, (gpu, k, broken)


def test_cuda_cells_rank_one_block_a_head_where_it_fits():
    """The CUDA cells' cost is T times a step's latency (kernels._cells_step_cycles): a head split
    over blocks pays a grid barrier every step, which more blocks do not make up for at a few
    products a warp, so a head that fits one block runs in one (as the Triton cells do: 1.8 us a
    step on the H100 against 4.0 for a 64-wide head in four blocks), and a 768-wide head, which
    fits no block whole, keeps the narrowest slices. (Among the sliced kernels: the fragment
    kernels, which take no slices, rank first where they apply, D <= 64.)"""
    tunable, hw = kernels.find("rnn", "cuda"), hardware.named("H100")
    for D, units in ((16, 16), (32, 32), (64, 64), (128, 16), (768, 16)):
        shape = {"cell": "lstm", "B": 16, "T": 1024, "H": 768 // D, "D": D}
        count, ranked = tuner.rank(tunable, shape, torch.bfloat16, hw)
        assert count and (ranked[0]["forward_fragments"] and ranked[0]["backward_fragments"]) == (D <= 64)
        ranked = [c for c in ranked if not c["forward_fragments"] and not c["backward_fragments"]]
        assert ranked[0]["units"] == units, (D, ranked[0])
        if D == 64:  # the step, not the SMs' utilisation: the split's 48 blocks are slower than 12
            whole, split = (tunable.cost(dict(ranked[0], units=u), shape, torch.bfloat16, hw) for u in (64, 16))
            assert split > 2 * whole


def test_triton_cells_rank_two_stages_first():
    """At one stage each step of the Triton cells' time loops waits a memory latency for its inputs
    (kernels._CELLS_UNPIPELINED: one stage timed 1.24x two at H12 D64 on the H200), so the model
    ranks a pipelined configuration first wherever one is legal."""
    tunable, hw = kernels.find("rnn", "triton"), hardware.named("H200")
    for cell, D in (("lstm", 64), ("gru", 32), ("lstm", 256)):
        shape = {"cell": cell, "B": 16, "T": 1024, "H": 768 // D, "D": D}
        _, ranked = tuner.rank(tunable, shape, torch.bfloat16, hw)
        assert ranked[0]["num_stages"] == 2, (cell, D, ranked[0])


def test_dry_run_exports_no_configuration_for_a_bucket_with_none_legal(tmp_path):
    """A 768-wide LSTM head fits no CUDA slice in an L4's 99 KB a block: its bucket ships nothing
    (the launch then says why it cannot run) rather than the kernel's default."""
    out = tmp_path / "l4.json"
    shapes = "cell=lstm,B=16,T=1024,H=1,D=768"
    assert main(["autotune", "--gpu", "L4", "--dry-run", "--ops", "rnn", "--shapes", shapes, "--export", str(out)]) == 0
    exported = json.loads(out.read_text())
    assert "rnn|triton|bfloat16:lstm:H1:D768:B~16" in exported
    assert not [k for k in exported if k.startswith("rnn|cuda|")]


def test_cli_dry_run_explain_and_export(tmp_path, capsys):
    out = tmp_path / "defaults.json"
    assert main(["autotune", "--gpu", "A100", "--dry-run", "--ops", "selective_scan", "rnn", "--export", str(out)]) == 0
    table = capsys.readouterr().out
    assert "selective_scan" in table and "rnn" in table and "legal" in table
    assert all(k.split("|")[0] in ("selective_scan", "rnn") for k in json.loads(out.read_text()))
    main(["autotune", "--explain", "linear_attn", "B=8,T=4096,H=16,K=128,V=128,gate=per-key", "--gpu", "H100"])
    text = capsys.readouterr().out
    assert "triton.linear_attn on H100" in text and "removes" in text and "winner by the model" in text
    # the model's costs as multiples of the roofline floor, and where the shipped configuration ranks
    assert "roofline floor of forward + backward" in text and "x the floor" in text
    assert re.search(r"shipped for H100 \(what runs until tuned\): \{.*\}: model cost .*, rank \d+ of \d+", text)
    with pytest.raises(SystemExit, match="measuring needs a GPU"):
        with warnings.catch_warnings():
            main(["autotune", "--ops", "rnn"])


@pytest.mark.parametrize("argv, message", [
    # an rnn shape given to the scan too raised KeyError: 'Dm' from the scan's space (2026-11-26)
    (["--dry-run", "--gpu", "H100", "--ops", "rnn", "selective_scan", "--shapes", "cell=gru,B=16,T=1024,H=12,D=64"],
     r"--shapes: shape .* lacks Dm, N for op 'selective_scan'"),
    (["--dry-run", "--gpu", "H100", "--ops", "rnn", "--shapes", "cell=gru,B=0,T=1024,H=12,D=64"],
     "--shapes: .*B must be a positive integer, got 0"),
    (["--dry-run", "--gpu", "H100", "--shapes", "B=8,T"], "--shapes: shape entries are name=value, got 'T'"),
    (["--explain", "rnn", "B=2", "--gpu", "H100"], "--explain: .* lacks cell, T, H, D for op 'rnn'"),
    (["--explain", "lstm", "B=2", "--gpu", "H100"], "--explain: no shapes for op 'lstm'"),
])
def test_cli_names_the_bad_shape(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["autotune", *argv])


def test_cli_rejects_unknown_ops(capsys):
    with pytest.raises(SystemExit):
        main(["autotune", "--dry-run", "--gpu", "H100", "--ops", "lstm"])
    assert "invalid choice: 'lstm'" in capsys.readouterr().err


def test_compile_screen_keeps_the_best_ranked_config_that_neither_spills_nor_overflows(monkeypatch):
    from rnnops._ptxas import KernelReport
    from rnnops.triton_backend import compile_check as triton_compile_check

    hw = hardware.named("A100")
    shape = {"B": 8, "T": 4096, "H": 16, "K": 128, "V": 128, "gate": "none"}
    tunable = kernels.find("linear_attn", "triton")
    ranked = [{"block_k": bk, "block_v": 64, "num_warps": 8, "num_stages": 2} for bk in (128, 64, 32, 16)]
    outcome = {128: (96, 0), 64: (0, hw.shared_memory_per_block + 1), 32: (0, 1024), 16: (0, 1024)}
    compiled = []

    def fake_compile(launches, arch):  # the launches: (config, shape) from fake_launches
        config, shape = launches
        compiled.append((arch, config["block_k"], shape["B"], shape["T"]))
        spilled, shared = outcome[config["block_k"]]
        return [KernelReport("output_kernel", 64, 0, 0, 0, 1024),
                KernelReport("dqk_kernel", 255, spilled, 0, 0, shared)]

    monkeypatch.setattr(triton_compile_check, "config_launches", lambda op, shape, dtype, config, hardware: (config, shape))
    monkeypatch.setattr(triton_compile_check, "compile_launches", fake_compile)
    screen, notes = tuner.CompileScreen(), []
    assert screen.choose(tunable, shape, torch.bfloat16, hw, ranked, notes)["block_k"] == 32
    assert notes == ["#1 rejected: 96 B spilled (dqk_kernel 96 B)",
                     f"#2 rejected: {hw.shared_memory_per_block + 1} B shared > {hw.shared_memory_per_block} B"]
    assert compiled == [(80, 128, 8, 4096), (80, 64, 8, 4096), (80, 32, 8, 4096)]
    bigger = dict(shape, T=16384)  # another size bucket, same kernels: nothing compiled again
    assert screen.choose(tunable, bigger, torch.bfloat16, hw, ranked, []) == ranked[2] and len(compiled) == 3
    outcome.update({32: (8, 1024), 16: (4, 1024)})  # nothing clean in the top: the least spilling that fits
    assert tuner.CompileScreen(top=4).choose(tunable, shape, torch.bfloat16, hw, ranked, [])["block_k"] == 16
    # state_num_warps (which the model ties) is screened at its default first: the same tile shape
    # with other state warps ranked ahead does not use up the screened few
    outcome.update({32: (0, 1024)})
    copies = [dict(ranked[0], state_num_warps=w) for w in (2, 8)]
    notes = []
    assert tuner.CompileScreen(top=3).choose(tunable, shape, torch.bfloat16, hw, copies + ranked, notes) == ranked[2]
    assert len(notes) == 2
    # the configuration shipped for the bucket is screened after the top few: where every one of
    # those spills, a shipped one that spills less stays (an illegal one is not screened)
    outcome.update({128: (96, 0), 64: (64, 1024), 32: (40, 1024), 16: (8, 1024)})
    screen = tuner.CompileScreen(top=2)
    assert screen.choose(tunable, shape, torch.bfloat16, hw, ranked, [], also=[ranked[3]]) == ranked[3]
    assert screen.choose(tunable, shape, torch.bfloat16, hw, ranked, [], also=[dict(ranked[3], block_k=7)]) == ranked[1]


def test_compile_screen_gets_past_a_compile_error_but_not_a_host_code_error(monkeypatch):
    """A configuration whose kernels this Triton cannot compile for the architecture: noted, and
    the model's first pick kept. An error of the op's host code (say, a shape the screen cut
    wrongly, as a grouped one was on 2026-11-27, when a catch-all shipped the first pick
    unscreened) is a bug and propagates."""
    from rnnops.triton_backend import compile_check as triton_compile_check

    hw, tunable = hardware.named("V100"), kernels.find("linear_attn", "triton")
    shape = {"B": 8, "T": 4096, "H": 16, "K": 128, "V": 128, "gate": "none"}
    ranked = [{"block_k": bk, "block_v": 64, "num_warps": 8, "num_stages": 2} for bk in (128, 64)]

    def cannot_target(launches, arch):
        raise RuntimeError(f"sm_{arch} is not supported")

    monkeypatch.setattr(triton_compile_check, "config_launches", lambda op, shape, dtype, config, hardware: [])
    monkeypatch.setattr(triton_compile_check, "compile_launches", cannot_target)
    notes = []
    assert tuner.CompileScreen().choose(tunable, shape, torch.bfloat16, hw, ranked, notes) == ranked[0]
    assert notes == [f"not compiled for {hw.arch}: RuntimeError: sm_70 is not supported"]

    def host_bug(op, shape, dtype, config, hardware):
        raise ValueError("H=2 is not a multiple of Hk=16")

    monkeypatch.setattr(triton_compile_check, "config_launches", host_bug)
    with pytest.raises(ValueError, match="multiple of Hk"):
        tuner.CompileScreen().choose(tunable, shape, torch.bfloat16, hw, ranked, [])


def test_neighbourhood_moves_along_one_variable_to_the_nearest_legal_values():
    from rnnops.autotune.search import Neighbourhood

    legal = [{"a": a, "b": b} for a in (1, 2, 4, 8) for b in (16, 32, 64) if not (a == 2 and b == 32)]
    moves = Neighbourhood(legal).moves
    assert moves({"a": 4, "b": 32}, "a") == [{"a": 1, "b": 32}, {"a": 8, "b": 32}]  # a=2 is illegal at b=32
    assert moves({"a": 1, "b": 16}, "b") == [{"a": 1, "b": 32}]
    assert moves({"a": 8, "b": 64}, "a") == [{"a": 4, "b": 64}]
    assert moves({"b": 32, "a": 4}, "a") == [{"b": 32, "a": 1}, {"b": 32, "a": 8}]  # any key order
    assert moves({"a": 4}, "a") == []  # a configuration lacking one of the space's variables: on no line


class _LandscapeLayout:
    """What every synthetic landscape over ``ranked`` shares: the variables of more than one value
    (their domains), each configuration's domain positions (float64, ranked's order) and index."""

    def __init__(self, ranked):
        self.domains = {n: d for n in ranked[0] if len(d := sorted({c[n] for c in ranked})) > 1}
        positions = {n: {value: i for i, value in enumerate(d)} for n, d in self.domains.items()}
        self.positions = torch.tensor([[positions[n][c[n]] for n in self.domains] for c in ranked],
                                      dtype=torch.float64).reshape(len(ranked), len(self.domains))
        self.index = {tuple(sorted(c.items())): i for i, c in enumerate(ranked)}
        self.rank = torch.arange(len(ranked), dtype=torch.float64) / len(ranked)


def _synthetic_landscape(ranked, seed, layout=None):
    """Seconds per configuration: a smooth bowl in each variable's domain position, with
    pairwise couplings, on top of the configuration's rank (the model is informative, not exact).
    Returns seconds(config), with ``seconds.all`` every configuration's, in ranked's order
    (computed at once: 35208 configurations a landscape for the delta rule)."""
    import random

    layout = layout or _LandscapeLayout(ranked)
    rng = random.Random(seed)
    bowls = {n: (rng.uniform(0, len(d) - 1), rng.uniform(0.0, 0.3)) for n, d in layout.domains.items()}
    couplings = {(a, b): rng.gauss(0, 0.05) for a in layout.domains for b in layout.domains if a < b}
    column = {n: i for i, n in enumerate(layout.domains)}
    pos = layout.positions - torch.tensor([center for center, _ in bowls.values()], dtype=torch.float64)
    log = 0.3 * layout.rank + (pos ** 2 * torch.tensor([w for _, w in bowls.values()], dtype=torch.float64)).sum(1)
    for (a, b), w in couplings.items():
        log += w * pos[:, column[a]] * pos[:, column[b]]
    every = (1e-3 * log.exp()).tolist()

    def seconds(config):
        return every[layout.index[tuple(sorted(config.items()))]]

    seconds.all = every
    return seconds


@pytest.mark.parametrize("op,shape", [
    ("delta_rule", {"B": 8, "T": 4096, "H": 16, "K": 128, "V": 128, "gated": False, "num_householder": 1}),
    ("rnn", {"cell": "lstm", "B": 16, "T": 1024, "H": 6, "D": 128}),
])
def test_search_gets_near_the_best_measuring_a_tenth_of_the_space(op, shape):
    from rnnops.autotune.search import Neighbourhood, coordinate_search, measurement_cap, movable_variables

    tunable = kernels.find(op, "triton")
    count, ranked = tuner.rank(tunable, shape, torch.bfloat16, hardware.named("H100"))
    # one value each: the delta rule's inverse_num_warps and dqk_programs_per_sm, the cells' recompute at D=128
    variables = movable_variables(ranked)
    assert variables == len(ranked[0]) - {"delta_rule": 2, "rnn": 1}[op]
    cap = measurement_cap(count, variables)
    assert cap == min(-(-count // 10), max(48, 7 * variables))
    near, top_near, layout, neighbourhood = 0, 0, _LandscapeLayout(ranked), Neighbourhood(ranked)
    for seed in range(40):
        seconds = _synthetic_landscape(ranked, seed, layout)
        calls = []
        found = coordinate_search(ranked, ranked[:2], lambda c, calls=calls, seconds=seconds: calls.append(c)
                                  or seconds(c), cap, neighbourhood=neighbourhood)
        best = min(seconds.all)
        assert found.measured == len(calls) <= cap and len({tuple(sorted(c.items())) for c in calls}) == len(calls)
        assert found.seconds == min(map(seconds, calls))
        near += found.seconds <= 1.03 * best
        top_near += min(seconds.all[:cap]) <= 1.03 * best  # measuring the model's first tenth instead
    # delta rule 25 against 0 (70 of 35208 measured, ten variables: nine had 31 of 40 at 63 before the
    # backward walk's own pipeline depth doubled the space), rnn 38 against 10 (48 of 486)
    assert near >= {"delta_rule": 25, "rnn": 35}[op] and near >= top_near + 10


def test_search_skips_failures_and_stops_when_told():
    from rnnops.autotune.search import coordinate_search

    ranked = [{"w": w} for w in (1, 2, 4, 8, 16)]
    times = {1: 5.0, 2: None, 4: 3.0, 8: 1.0, 16: 2.0}
    found = coordinate_search(ranked, [{"w": 1}], lambda c: times[c["w"]], max_measured=5)
    assert found.best == {"w": 8} and found.timings[(("w", 2),)] is None  # walked past the failing one
    stopped = coordinate_search(ranked, [{"w": 1}], lambda c: times[c["w"]], 5, should_stop=lambda: True)
    assert stopped.measured == 0 and stopped.best is None


def test_tune_dedups_buckets_covers_every_kernel_first_and_stores_the_search_result(tmp_path, monkeypatch):
    hw = hardware.named("H100")
    shapes = [{"cell": cell, "B": B, "T": 1024, "H": 6, "D": 128} for cell, B in
              (("lstm", 16), ("lstm", 12), ("lstm", 64), ("lstm", 32), ("gru", 16))]
    order = [(t.backend, b.split(":")[1], b.split("~")[1])
             for t, _, b in tuner.tuning_order(kernels.tunables(["rnn"]), lambda op: shapes, torch.bfloat16)]
    # B 12 and 16 share a bucket; the middle size of every kernel shape first, then the rest
    assert order == [("triton", "lstm", "32"), ("triton", "gru", "16"), ("cuda", "lstm", "32"), ("cuda", "gru", "16"),
                     ("triton", "lstm", "16"), ("triton", "lstm", "64"), ("cuda", "lstm", "16"), ("cuda", "lstm", "64")]

    device_cache = TuneCache(tmp_path / "device.json", IDENTITY)
    monkeypatch.setattr(cache, "for_device", lambda device: device_cache)
    landscapes, prepared = {}, []

    def timer(tunable, shape, bucket):
        if tunable.backend == "cuda":
            raise tuner.Unsupported("no simulator timings")
        ranked = tuner.rank(tunable, shape, torch.bfloat16, hw)[1]
        landscapes[bucket] = _synthetic_landscape(ranked, 7)
        return tuner.ShapeTimer(landscapes[bucket], lambda configs: prepared.append(len(configs)))

    results = tuner.tune(["rnn"], torch.device("cpu"), torch.bfloat16, hw, shapes=shapes[:1], timer=timer)
    triton_result, cuda_result = results
    assert cuda_result.notes == ["skipped: no simulator timings"] and cuda_result.seconds is None
    assert 0 < triton_result.measured <= -(-triton_result.legal // 10)
    entry = device_cache.get("rnn", "triton", triton_result.bucket)
    assert entry["config"] == triton_result.config and entry["measured"] == triton_result.measured
    assert triton_result.seconds == landscapes[triton_result.bucket](triton_result.config)
    # the seeds (the model's two, the default, the H100's shipped entry: 3 or 4 distinct), then each
    # round's one-variable moves
    assert prepared[0] in (3, 4) and len(prepared) > 1
    from rnnops.autotune import cli

    assert triton_result.wall_seconds > 0 and cuda_result.wall_seconds >= 0
    total = triton_result.wall_seconds + cuda_result.wall_seconds
    assert cli.table(results).endswith(f"tuning wall time per op: rnn {total:.1f} s (total {total:.1f} s)")

    exhaustive = tuner.tune(["rnn"], torch.device("cpu"), torch.bfloat16, hw, shapes=shapes[:1], timer=timer,
                            exhaustive=True)[0]
    assert exhaustive.measured == exhaustive.legal
    assert exhaustive.seconds == min(map(landscapes[exhaustive.bucket], tuner.rank(
        kernels.find("rnn", "triton"), shapes[0], torch.bfloat16, hw)[1]))
    (note,) = [n for n in exhaustive.notes if n.startswith("search alone")]
    assert f"of {exhaustive.legal}" in note


def test_untuned_buckets_take_the_nearest_tuned_size_then_the_shipped_defaults(tmp_path):
    device_cache = TuneCache(tmp_path / "device.json", IDENTITY)
    prefix = "linear_attn|triton|bfloat16:K128:V128:none:tokens~"
    shipped = cache.shipped_defaults(IDENTITY["gpu"])
    assert device_cache.config_for(prefix + "524288") == shipped[prefix + "524288"]
    assert device_cache.config_for(prefix + "33554432") == shipped[prefix + "2097152"]  # nearest shipped size
    device_cache.put({prefix + "131072": {"config": {"block_k": 16}, "seconds": 1.0}})
    assert device_cache.config_for(prefix + "131072") == {"block_k": 16}
    assert device_cache.config_for(prefix + "33554432") == {"block_k": 16}  # measured here beats shipped
    device_cache.put({prefix + "16777216": {"config": {"block_k": 64}, "seconds": 1.0}})
    assert device_cache.config_for(prefix + "33554432") == {"block_k": 64}
    assert device_cache.config_for(prefix + "1048576") == {"block_k": 16}  # 2^20: 3 doublings from 2^17, 4 from 2^24
    assert device_cache.config_for("linear_attn|triton|float16:K64:V64:none:tokens~1024") is None
    device_cache.put({prefix + "many": {"config": {"block_k": 128}}})  # a foreign key: never a neighbour
    assert device_cache.config_for(prefix + "1048576") == {"block_k": 16} and device_cache.config_for("x|y|z") is None


def test_untimed_buckets_take_the_backend_a_suite_run_timed_fastest(tmp_path):
    """autotune/defaults/backends.json: every entry names an offline GPU, an op's registered
    backend and a bucket of the op's standard shapes, with its evidence; a device's cache without
    timings for the bucket takes it, one with timings its own fastest, other buckets and GPUs none."""
    from rnnops import _dispatch

    shipped = json.loads((cache.DEFAULTS_DIR / "backends.json").read_text())
    slugs = {cache._slug(hardware.named(gpu).name) for gpu in GPUS}
    assert shipped and set(shipped) <= slugs
    for entries in shipped.values():
        for name, entry in entries.items():
            op, bucket = name.split("|")
            assert entry["backend"] in _dispatch.available(op) and entry["measured"]
            assert bucket in {kernels.bucket(op, shape, dtype) for shape in tuner.standard_shapes(op)
                              for dtype in (torch.bfloat16, torch.float16, torch.float32)}
    h200 = dict(IDENTITY, gpu="NVIDIA H200")
    scan = "bfloat16:N16:Dm~2048:B~8"
    assert TuneCache(tmp_path / "h200.json", h200).best_backend("selective_scan", scan) == "cuda"
    assert TuneCache(tmp_path / "h200.json", h200).best_backend("selective_scan", "bfloat16:N16:Dm~2048:B~1") is None
    assert _cache(tmp_path).best_backend("selective_scan", scan) is None  # the H100: not timed there since
    tuned = TuneCache(tmp_path / "h200.json", h200)
    tuned.put({f"selective_scan|triton|{scan}": {"config": {}, "seconds": 1.0},
               f"selective_scan|cuda|{scan}": {"config": {}, "seconds": 2.0}})
    assert tuned.best_backend("selective_scan", scan) == "triton"


def test_device_timer_measures_and_compiles_ahead_in_worker_processes():
    """On the CPU through Triton's interpreter (the workers inherit TRITON_INTERPRET=1): a legal
    configuration is run and vetted in a worker process, one its config type rejects fails there
    and is then never run in the timed process."""
    shape = {"cell": "gru", "B": 2, "T": 3, "H": 1, "D": 16}
    tunable = kernels.find("rnn", "triton")
    bucket = kernels.bucket("rnn", shape, torch.float32)
    good = {"block_b": 16, "block_d": 16, "block_k": 16, "num_warps": 2, "num_stages": 1}
    shape_timer = tuner.device_timer(torch.device("cpu"), torch.float32, compile_workers=2)(tunable, shape, bucket)
    assert shape_timer.prepare([good, dict(good, unroll=2)]) == 1  # no such field: the worker fails
    assert shape_timer.measure(good) > 0
    with pytest.raises(tuner.Rejected, match="failed in its worker process .exit status 1.: TypeError: .*unroll"):
        shape_timer.measure(dict(good, unroll=2))
    with pytest.raises(tuner.Unsupported, match="needs a CUDA device"):
        tuner.device_timer(torch.device("meta"), torch.float32)(tunable, shape, bucket)


def test_a_measurement_after_the_gpu_idled_spins_it_up_first(monkeypatch):
    """The first measurement of a shape, and one after a second without work, follows 0.3 s of
    untimed calls (an idle GPU's low clocks made the first of four A/B configurations 1.6x slower
    than its bench time); one right after another does not."""
    spins = []
    monkeypatch.setattr(tuner, "measure_config", lambda *args: spins.append(args[-1]) or 1.0)
    shape = {"cell": "gru", "B": 2, "T": 3, "H": 1, "D": 16}
    tunable = kernels.find("rnn", "triton")
    bucket = kernels.bucket("rnn", shape, torch.float32)
    good = {"block_b": 16, "block_d": 16, "block_k": 16, "num_warps": 2, "num_stages": 1}
    # a clock that moves only when the test says so: vetting a configuration on a slow machine
    # must not read as the GPU idling
    clock = [100.0]
    monkeypatch.setattr(tuner.time, "perf_counter", lambda: clock[0])
    shape_timer = tuner.device_timer(torch.device("cpu"), torch.float32)(tunable, shape, bucket)
    shape_timer.measure(good)
    clock[0] += 0.5
    shape_timer.measure(dict(good, num_warps=4))
    clock[0] += 1.5
    shape_timer.measure(good)
    assert spins == [0.3, 0.0, 0.3]


def test_each_timed_call_starts_from_cleared_gradients():
    """As the bench times a call: a second call's gradients are its own, not added to the first's
    (which costs a pass over every input)."""
    shape = {"cell": "gru", "B": 2, "T": 3, "H": 1, "D": 16}
    case = tuner.case_for("rnn", shape)
    x = tuner.inputs_with_grads(case, torch.device("cpu"), torch.float32)
    tuner.forward_backward(case, x, "reference")
    once = {k: v.grad.clone() for k, v in x.items() if isinstance(v, torch.Tensor) and v.grad is not None}
    tuner.forward_backward(case, x, "reference")
    assert once and all(torch.equal(x[k].grad, g) for k, g in once.items())


def test_spin_up_calls_back_to_back_for_its_seconds_on_a_gpu_only(monkeypatch):
    from rnnops.bench import timing

    calls = []
    timing.spin_up(lambda: calls.append(1), torch.device("cpu"), 0.05)
    assert calls == []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    began = time.perf_counter()
    timing.spin_up(lambda: calls.append(1), torch.device("cuda"), 0.05)
    assert time.perf_counter() - began >= 0.05 and len(calls) > 1


def test_a_configuration_whose_answer_is_wrong_is_rejected_before_it_is_timed(monkeypatch, tmp_path):
    """vet() compares the kernel with the float64 reference at a small size: here the reference is
    made to answer 1.5 times the truth, as a miscompiled kernel would differ from it, and the
    timer refuses the configuration (in the timed process: no workers) and stays refused."""
    from rnnops.bench import cases

    shape = {"cell": "gru", "B": 2, "T": 3, "H": 1, "D": 16}
    tunable = kernels.find("rnn", "triton")
    bucket = kernels.bucket("rnn", shape, torch.float32)
    good = {"block_b": 16, "block_d": 16, "block_k": 16, "num_warps": 2, "num_stages": 1}
    assert tuner.vet("rnn", "triton", shape, torch.device("cpu"), torch.float32, good) is None
    rnn_case = cases.rnn_case

    def skewed_reference(*args, **flags):
        case = rnn_case(*args, **flags)
        return dataclasses.replace(case, run=lambda x, backend: case.run(x, backend) * (1.5 if backend == "reference"
                                                                                        else 1.0))

    monkeypatch.setattr(cases, "rnn_case", skewed_reference)
    shape_timer = tuner.device_timer(torch.device("cpu"), torch.float32)(tunable, shape, bucket)
    for _ in range(2):
        with pytest.raises(tuner.Rejected, match="the output differs from the float64 reference by 3.3e-01"):
            shape_timer.measure(good)
    verdict = tmp_path / "verdict.txt"  # what a vetting worker process reports, run here
    assert tuner.vet_in_worker("rnn", "triton", shape, bucket, "cpu", "float32", good, str(verdict)) == \
        tuner.WRONG_ANSWER
    assert verdict.read_text().startswith("the output differs from the float64 reference by 3.3e-01")


@pytest.mark.gpu
@pytest.mark.parametrize("tunable", kernels.TUNABLES, ids=lambda t: t.name)
def test_vetting_passes_each_kernels_default_on_the_gpu(tunable):
    """On the GPU, in bfloat16, vet() accepts every kernel's default configuration at each kernel
    shape's small size: its tolerance against the float64 reference is not so tight that the
    tuner would reject every configuration of some kernel."""
    device = torch.device("cuda")
    for shape in {kernels.bucket(tunable.op, s, torch.bfloat16).rsplit(":", 1)[0]: s
                  for s in tuner.standard_shapes(tunable.op)}.values():  # one shape per kernel shape
        try:
            reason = tuner.vet(tunable.op, tunable.backend, shape, device, torch.bfloat16, tunable.default())
        except ValueError as error:  # a shape the backend does not take (the Triton cells at D = 768)
            assert "cannot take these inputs" in str(error)
            continue
        assert reason is None, (shape, reason)


def test_tries_measure_the_shipped_configuration_and_its_changes_and_store_nothing(tmp_path, monkeypatch):
    from rnnops.autotune import cli

    hw = hardware.named("H100")
    device_cache = TuneCache(tmp_path / "device.json", IDENTITY)
    monkeypatch.setattr(cache, "for_device", lambda device: device_cache)
    shape = {"B": 8, "T": 4096, "H": 16, "K": 128, "V": 128, "gated": False, "num_householder": 1}
    measured = []

    def kernels_of(config):  # block_k 32: dq/dk faster; state_num_stages 1: the walk 1% slower (not shown)
        return {"dqk_kernel": 2e-4 if config["block_k"] == 32 else 4e-4,
                "states_bwd_kernel": 3.03e-4 if config["state_num_stages"] == 1 else 3e-4}

    def timer(tunable, shape, bucket):
        return tuner.ShapeTimer(lambda config: measured.append(config) or (8e-4 if config["block_k"] == 32 else 1e-3),
                                kernels=kernels_of)

    changes = [{"block_k": 32}, {"state_num_stages": 1}]
    foreign = {"num_warps": 4, "items": 8}  # another backend's variable: noted, not measured
    (result,) = tuner.tune(["delta_rule"], torch.device("cpu"), torch.bfloat16, hw, shapes=[shape],
                           tries=[*changes, foreign], timer=timer)
    shipped = cache.shipped_defaults("H100")[cache.key("delta_rule", "triton", result.bucket)]
    assert measured == [shipped] + [dict(shipped, **change) for change in changes]
    assert result.notes == [f"{foreign}: not tried, items not variables of this kernel"]
    assert result.config == dict(shipped, block_k=32) and device_cache.entries == {}
    text = cli.tries_table([result])
    assert "shipped" in text and "{'block_k': 32}" in text and "1.25x" in text and " triton " in text
    assert f"kernels: delta_rule {result.bucket} {{'block_k': 32}}: dqk_kernel 0.400 -> 0.200 ms" in text
    assert f"kernels: delta_rule {result.bucket} {{'state_num_stages': 1}}: none moved 3%" in text
    assert text.endswith(f"note: triton.delta_rule {result.notes[0]}")


def test_kernel_moves_name_what_changed_most_first():
    from rnnops.autotune.cli import kernel_moves

    shipped = {"dqk_kernel": 1.128e-3, "output_kernel": 2.56e-4, "states_fwd_kernel": 1.56e-4}
    changed = {"dqk_kernel": 6.1e-4, "output_kernel": 2.6e-4, "fused_fwd_kernel": 1.8e-4}
    assert kernel_moves(shipped, changed) == ("dqk_kernel 1.128 -> 0.610 ms, fused_fwd_kernel - -> 0.180 ms, "
                                              "states_fwd_kernel 0.156 -> - ms")


def test_tries_for_another_backend_measure_nothing(tmp_path, monkeypatch):
    """--try serves every backend of an op: a kernel none of whose changes apply is not timed
    (its shipped configuration alone would compare nothing)."""
    monkeypatch.setattr(cache, "for_device", lambda device: TuneCache(tmp_path / "device.json", IDENTITY))
    measured = []

    def timer(tunable, shape, bucket):
        return tuner.ShapeTimer(lambda config: measured.append((tunable.backend, config)) or 1e-3)

    shape = {"B": 8, "T": 2048, "Dm": 2048, "N": 16}
    results = tuner.tune(["selective_scan"], torch.device("cpu"), torch.bfloat16, hardware.named("H100"),
                         shapes=[shape], tries=[{"stage_rows": 0}], timer=timer)
    assert [backend for backend, _ in measured] == ["cuda", "cuda"] and measured[1][1]["stage_rows"] == 0
    triton_result = next(r for r in results if r.backend == "triton")
    assert triton_result.timings == [] and "stage_rows not variables" in triton_result.notes[0]


@pytest.mark.parametrize("shape,small", [
    ({"B": 8, "T": 4096, "H": 32, "Hk": 16, "K": 128, "V": 128, "gated": True}, {"H": 2, "Hk": 1}),
    ({"B": 8, "T": 2048, "H": 80, "Hk": 1, "K": 128, "V": 64, "gate": "scalar"}, {"H": 80, "Hk": 1}),
    ({"B": 8, "T": 4096, "H": 16, "K": 128, "V": 128, "gate": "none"}, {"H": 2}),
], ids=["GVA", "SSD", "ungrouped"])
def test_compile_screens_cut_shapes_keeping_the_head_group(shape, small):
    """The compile screen and the vetting run a shape cut to a few heads: grouped q / k heads keep
    H / Hk (a constexpr of the kernels) and stay legal, so the screen compiles them (a GVA shape
    cut to H 2 with Hk 16 had raised inside the screen, which then shipped its first pick
    unscreened)."""
    from rnnops.triton_backend.compile_check import small_shape

    op = "delta_rule" if "gated" in shape else "linear_attn"
    cut = small_shape(op, shape)
    assert {k: cut[k] for k in small} == small and cut["B"] == 1
    case = tuner.case_for(op, dict(cut, num_householder=1) if op == "delta_rule" else cut)
    x = case.make(torch.device("cpu"), torch.float32)
    assert x["q"].shape[2] == small.get("Hk", small["H"]) and x["v"].shape[2] == small["H"]
    case.run(x, "chunked")  # a legal call

