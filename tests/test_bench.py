"""The bench harness and report end to end on tiny cases (the real --quick run is the README's
main job; its cases are too slow for a test)."""
import json
import os
import pathlib
import re
import time
from types import SimpleNamespace

import pytest
import torch

import rnnops
from rnnops.__main__ import main
from rnnops.bench import cases as bench_cases
from rnnops.autotune import hardware
from rnnops.bench import cli, report, roofline, runner
from rnnops.bench import precompile as precompile_module
from rnnops.bench.precompile import precompile, warm_up
from rnnops.bench.runner import Target, run_case
from rnnops.bench.timing import batch_size, call_estimate, host_breakdown, measure, peak_memory

CPU = torch.device("cpu")


def tiny_cases():
    return [
        bench_cases.linear_attn_case("per-key", 1, 20, 2, 8, 8, quick=True, sweep="T"),
        bench_cases.linear_attn_case("per-key", 1, 40, 2, 8, 8, sweep="T"),
        bench_cases.delta_case(2, True, 1, 12, 2, 8, 8, quick=True),
        bench_cases.selective_scan_case(1, 16, 8, 4, quick=True),
        bench_cases.rnn_case("gru", 2, 6, 2, 4, quick=True),
    ]


def test_standard_cases_cover_every_family_on_both_devices():
    families = {"linear_attn", "delta_rule", "delta_product", "selective_scan", "rnn"}
    for device in ("cpu", "cuda"):
        cases = bench_cases.standard_cases(torch.device(device))
        assert {c.op for c in cases} == families
        assert {c.op for c in cases if c.quick} == families
        assert len({c.name for c in cases}) == len(cases), "case names must be unique"


@pytest.mark.parametrize("case", tiny_cases(), ids=lambda c: c.name)
def test_every_case_runs_every_target(case):
    rows, notes = run_case(case, CPU, torch.float32, repeats=1)
    assert {r["target"] for r in rows} >= set(rnnops.available_backends(case.op)) - {"triton", "cuda"}
    for row in rows:
        assert not row["mismatch"], row
        assert row["fwd"].median > 0 and row["fwd_bwd"].median > 0
        assert row["roofline"]["fwd"]["tflops"] > 0 and row["roofline"]["fwd"]["fraction"] is None
    if case.op == "rnn":
        assert "torch.nn.GRU" in {r["target"] for r in rows}


def test_the_scans_floor_is_their_exponentials_where_those_bind():
    """Mamba-1's scan computes one e^x per step, channel and state element: on an H100 (16 per SM
    per clock) that takes longer than moving its bytes, so the floor is the special-function bound;
    the linear family's floor stays bytes or flops."""
    h100 = hardware.named("H100")
    scan = roofline.selective_scan(8, 2048, 2048, 16, torch.bfloat16)
    assert scan.floor_seconds(h100, "fwd") == pytest.approx(8 * 2048 * 2048 * 16 / h100.exp_rate)
    assert scan.floor_seconds(h100, "fwd") > scan.bytes / h100.memory_bandwidth
    assert scan.floor_seconds(h100, "fwd_bwd") == pytest.approx(3 * scan.floor_seconds(h100, "fwd"))
    attention = roofline.linear_attn(8, 4096, 16, 128, 128, "none", torch.bfloat16)
    flops, moved = attention.phase("fwd")
    assert attention.floor_seconds(h100, "fwd") == max(moved / h100.memory_bandwidth, flops / h100.peak("bfloat16"))


def test_a_wrong_target_is_reported_as_a_mismatch(monkeypatch):
    case = bench_cases.linear_attn_case("none", 1, 10, 1, 4, 4)
    good = case.run
    monkeypatch.setattr(case, "run", lambda x, backend: good(x, backend) * (1.01 if backend == "chunked" else 1))
    rows, _ = run_case(case, CPU, torch.float32, repeats=1)
    assert {r["target"]: r["mismatch"] for r in rows} == {"reference": False, "chunked": True}


def test_cli_writes_a_report_that_parses_back(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "standard_cases", lambda device: tiny_cases())
    assert main(["bench", "--quick", "--ops", "linear_attn", "rnn", "--repeats", "1", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "torch.nn.GRU" in table and "x base f+b" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["rnnops"] == rnnops.__version__ and results["dtype"] == "float32"
    assert {(r["op"], r["target"]) for r in results["rows"]} == {
        ("linear_attn", "reference"), ("linear_attn", "chunked"), ("rnn", "reference"), ("rnn", "torch.nn.GRU")}
    for row in results["rows"]:
        assert row["fwd"]["median_s"] > 0 and len(row["fwd_bwd"]["samples_s"]) >= 1
    markdown = (tmp_path / "report.md").read_text()
    assert "## linear_attn" in markdown and "| case | target |" in markdown
    assert "speedup.png" in markdown  # rnn: reference against torch.nn.GRU
    html = (tmp_path / "report.html").read_text()
    assert html.count("<table>") >= 2 and "data:image/png;base64" in html
    assert report.console_table(results) in table


def test_full_mode_plots_the_sweeps(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "standard_cases", lambda device: tiny_cases()[:2])
    main(["bench", "--repeats", "1", "--out", str(tmp_path)])
    assert (tmp_path / "throughput_T.png").stat().st_size > 1000


def test_budget_stops_starting_cases_and_every_case_is_saved_at_once(monkeypatch, tmp_path, capsys):
    linear, linear_longer, delta = tiny_cases()[:3]
    saved = []
    real_run_case = cli.run_case

    def run_case(case, *args, **kwargs):
        if case is delta:  # the families take turns; the first case's results are on disk before the next starts
            saved.append(json.loads((tmp_path / "results.json").read_text()))
            monkeypatch.setattr(cli, "time", SimpleNamespace(perf_counter=lambda: float("inf")))  # budget spent
        return real_run_case(case, *args, **kwargs)

    monkeypatch.setattr(cli, "standard_cases", lambda device: [linear, linear_longer, delta])
    monkeypatch.setattr(cli, "run_case", run_case)
    main(["bench", "--repeats", "1", "--budget-s", "1000", "--out", str(tmp_path)])
    assert {r["case"] for r in saved[0]["rows"]} == {linear.name}
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["case"] for r in results["rows"]} == {linear.name, delta.name}
    assert results["notes"]["interrupted"] == ["time budget of 1000 s spent: stopped after 2 of 3 cases"]


def test_families_take_turns_and_results_keep_the_standard_order(monkeypatch, tmp_path):
    cases = tiny_cases()
    order = bench_cases.families_in_turn(cases)
    assert [c.name for c in order] == [cases[i].name for i in (0, 2, 3, 4, 1)]
    monkeypatch.setattr(cli, "standard_cases", lambda device: cases[:3])
    main(["bench", "--repeats", "1", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(dict.fromkeys(r["case"] for r in results["rows"])) == [c.name for c in cases[:3]]
    assert [name for name in results["notes"] if name in {c.name for c in cases}] == [c.name for c in cases[:3]]


def test_stalest_families_go_first(monkeypatch, tmp_path):
    """--stalest-first: the op families earlier results files timed longest ago take their turns
    first (never timed: first of all), so successive runs stopped by their budget (the GPU suite's
    reached 2 of 9 cases on 2026-11-27) cover every family; an unreadable file counts for nothing."""
    def results(name, date, ops):
        path = tmp_path / name
        path.write_text(json.dumps({"environment": {"date": date}, "rows": [{"op": op} for op in ops]}))
        return path

    files = [results("a.json", "2026-11-26T10:00:00", ["linear_attn", "rnn", "delta_rule"]),
             results("b.json", "2026-11-27T05:52:08", ["linear_attn", "delta_rule"]), tmp_path / "missing.json"]
    cases = tiny_cases()
    first = cli.stalest_first([c.op for c in cases], files)
    assert first == ["delta_product", "selective_scan", "rnn", "linear_attn"]  # never timed in standard order
    order = bench_cases.families_in_turn(cases, first)
    assert [c.name for c in order] == [cases[i].name for i in (2, 3, 4, 0, 1)]
    monkeypatch.setattr(cli, "standard_cases", lambda device: cases[:3])
    main(["bench", "--repeats", "1", "--out", str(tmp_path / "out"), "--stalest-first", *map(str, files)])
    notes = json.loads((tmp_path / "out" / "results.json").read_text())["notes"]
    assert notes["order"] == ["op families by when 3 earlier results file(s) last timed them, longest ago first: "
                              "delta_product, linear_attn"]


@pytest.mark.parametrize("peers", [False, True])
def test_warm_up_runs_each_of_our_backends_once_and_peers_when_asked(monkeypatch, peers):
    calls, asked = [], []

    def target(name, kind, fails=False):
        def call(x):
            calls.append(name)
            if fails:
                raise ValueError("cannot take these inputs")
            return x["q"] * 2
        return Target(name, kind, lambda x: x, call, lambda out: out)

    def targets_for(case, device, dtype, backends, include_peers):
        asked.append(include_peers)
        targets = [target("chunked", "rnnops"), target("triton", "rnnops", fails=True)]
        return targets + ([target("fla", "peer"), target("fla.naive", "peer-reference")] if include_peers else []), []

    monkeypatch.setattr(precompile_module, "targets_for", targets_for)
    assert warm_up(tiny_cases()[0], CPU, torch.float32, peers=peers) == 1 + peers
    assert asked == [peers] and calls == ["chunked", "triton"] + (["fla"] if peers else [])


def test_warm_up_records_the_target_it_is_warming(monkeypatch, tmp_path):
    """What a killed worker was doing: the progress file names the target until all are done."""
    class Stopped(BaseException):  # as if the worker stopped here (warm_up suppresses Exceptions only)
        pass

    def interrupted(x):
        raise Stopped

    targets = [Target("chunked", "rnnops", lambda x: x, lambda x: x["q"] * 2, lambda out: out),
               Target("flashrnn.cuda", "peer", lambda x: x, interrupted, lambda out: out)]
    monkeypatch.setattr(precompile_module, "targets_for", lambda *args, **kwargs: (targets, []))
    progress_file = tmp_path / "0.json"
    with pytest.raises(Stopped):
        warm_up(tiny_cases()[0], CPU, torch.float32, peers=True, progress_file=progress_file)
    assert json.loads(progress_file.read_text()) == {"warming": "flashrnn.cuda"}
    del targets[1]
    assert warm_up(tiny_cases()[0], CPU, torch.float32, progress_file=progress_file) == 1
    assert json.loads(progress_file.read_text()) == {"warming": None}


def test_a_peer_whose_precompile_stopped_is_left_out_of_the_timed_run():
    case = tiny_cases()[4]  # the GRU case: torch.nn.GRU is always a peer (and compiles nothing)
    for at_limit, reason in ((False, "a crash"), (True, "its time limit")):
        rows, notes = run_case(case, CPU, torch.float32, backends=["reference"], repeats=1,
                               stopped_peer="torch.nn.GRU", stopped_at_time_limit=at_limit)
        assert [row["target"] for row in rows] == ["reference"]
        assert f"torch.nn.GRU: skipped, its precompile worker stopped while warming it ({reason})" in notes
    rows, _ = run_case(case, CPU, torch.float32, backends=["reference"], repeats=1, stopped_peer="reference")
    assert [row["target"] for row in rows] == ["reference", "torch.nn.GRU"]  # our own backends are always timed


def test_a_triton_peer_stopped_at_the_precompile_time_limit_is_timed(monkeypatch):
    """Its kernels compile one by one into Triton's disk cache: the timed run compiles the rest.
    Stopped by a crash, it is left out all the same."""
    case = tiny_cases()[0]
    incremental = Target("fla.chunk_simple_gla", "peer", lambda x: x, lambda x: x["q"] * 2, lambda out: out, True)
    monkeypatch.setattr(runner, "targets_for", lambda *args, **kwargs: (
        [Target("chunked", "rnnops", lambda x: x, lambda x: x["q"] * 2, lambda out: out), incremental], []))
    rows, notes = run_case(case, CPU, torch.float32, repeats=1, stopped_peer=incremental.name,
                           stopped_at_time_limit=True)
    assert [row["target"] for row in rows] == ["chunked", incremental.name]
    assert any(note.startswith(f"{incremental.name}: its precompile worker reached its time limit") for note in notes)
    rows, _ = run_case(case, CPU, torch.float32, repeats=1, stopped_peer=incremental.name)
    assert [row["target"] for row in rows] == ["chunked"]


def test_precompile_tells_a_worker_killed_at_its_time_limit(monkeypatch):
    """Precompiled.timed_out: the cases whose worker was killed (status None), not those that
    exited, cleanly or not."""
    cases = tiny_cases()[:3]
    monkeypatch.setattr(precompile_module, "run_side_by_side", lambda *args, **kwargs: [0, None, 1])
    warmed = precompile(cases, CPU, torch.float32, None, 3)
    assert (warmed.clean, warmed.timed_out) == (1, frozenset({cases[1].name}))


def test_compile_only_autotuning_launches_each_configuration_once_and_restores_triton(monkeypatch):
    from triton.runtime.autotuner import Autotuner

    stored, writes = {("stored",)}, []

    def triton_look_up(self, tuning_key, configs, bench_fn):  # Triton's check_disk_cache, in small
        if tuning_key in stored:
            return True  # took the stored choice: no benchmark
        bench_fn()
        writes.append(tuning_key)  # (a benchmark that raised stores nothing)
        return False

    monkeypatch.setattr(Autotuner, "check_disk_cache", triton_look_up)
    before = Autotuner.__dict__["do_bench"], Autotuner.__dict__["check_disk_cache"]
    launches, benchmarks = [], []
    with precompile_module.compile_only_autotuning() as patched:
        assert patched
        tuner = Autotuner.__new__(Autotuner)  # neither reads instance state once patched
        timings = [tuner.do_bench(lambda c=config: launches.append(c), quantiles=(0.5, 0.2, 0.8)) for config in "ab"]
        # an autotuner with cache_results benchmarks and stores nothing, unless a choice is stored
        assert tuner.check_disk_cache(("key",), [], lambda: benchmarks.append("key")) is False
        assert tuner.check_disk_cache(("stored",), [], lambda: benchmarks.append("stored")) is True
    assert launches == ["a", "b"] and timings == [[1.0] * 3] * 2 and benchmarks == ["key"] and writes == []
    assert (Autotuner.__dict__["do_bench"], Autotuner.__dict__["check_disk_cache"]) == before


def test_autotuners_compile_every_configuration_side_by_side_before_timing_any(monkeypatch):
    """An autotuner about to time its configurations (no stored choice) first compiles each one
    (a warm-up launch inside triton.AsyncCompileMode), then times them as before; one that takes
    a stored choice compiles nothing more. Inside compile_only_autotuning (as the precompile
    workers nest them) likewise, and nothing is stored."""
    from triton.runtime import _async_compile
    from triton.runtime.autotuner import Autotuner, Config

    launches, writes = [], []

    class Kernel:  # the autotuned JIT function: a launch, or a compile where AsyncCompileMode is on
        def run(self, *args, **kwargs):
            compiling = _async_compile.active_mode.get() is not None
            launches.append(("compile" if compiling else "time", args, kwargs["BLOCK"], kwargs["warmup"]))

    def triton_look_up(self, tuning_key, configs, bench_fn):  # Triton's check_disk_cache, in small
        if tuning_key == ("stored",):
            return True
        bench_fn()
        writes.append(tuning_key)
        return False

    def triton_run(self, *args, **kwargs):  # Triton's Autotuner.run, in small: look up, else time each
        def benchmark():
            for config in self.configs:
                self.do_bench(lambda c=config: self.fn.run(*args, **kwargs, **c.all_kwargs()), quantiles=(0.5,))
        self.check_disk_cache(kwargs["key"], self.configs, benchmark)

    monkeypatch.setattr(Autotuner, "check_disk_cache", triton_look_up)
    monkeypatch.setattr(Autotuner, "run", triton_run)
    monkeypatch.setattr(Autotuner, "do_bench", property(lambda self: lambda call, quantiles: call()))
    before = Autotuner.__dict__["run"], Autotuner.__dict__["check_disk_cache"]
    tuner = Autotuner.__new__(Autotuner)
    tuner.fn, tuner.configs = Kernel(), [Config({"BLOCK": 16}), Config({"BLOCK": 32})]
    expected = [("compile", ("x",), 16, True), ("compile", ("x",), 32, True),
                ("time", ("x",), 16, False), ("time", ("x",), 32, False)]
    with precompile_module.autotuner_compiles_side_by_side(threads=2) as patched:
        assert patched
        tuner.run("x", key=("fresh",), grid=(1,), warmup=False)
        tuner.run("x", key=("stored",), grid=(1,), warmup=False)
    assert launches == expected and writes == [("fresh",)]
    launches.clear(), writes.clear()
    with precompile_module.autotuner_compiles_side_by_side(threads=2), precompile_module.compile_only_autotuning():
        tuner.run("x", key=("fresh",), grid=(1,), warmup=False)
    assert launches == expected and writes == []
    assert (Autotuner.__dict__["run"], Autotuner.__dict__["check_disk_cache"]) == before
    with precompile_module.autotuner_compiles_side_by_side(threads=1) as patched:  # one thread: nothing to gain
        assert not patched and Autotuner.__dict__["run"] is before[0]


@pytest.mark.gpu
def test_a_real_autotuner_has_every_configuration_compiled_when_it_times_the_first(monkeypatch, tmp_path):
    import triton
    import triton.language as tl

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # cold: no compiled kernel, no stored choice
    compiled_at_first_timing = []

    def timing(kernel_call, quantiles):
        if not compiled_at_first_timing:  # (the JIT function's in-memory kernels, per device)
            caches = list(double.fn.device_caches.values())
            compiled_at_first_timing.append(len(caches[0][0]) if caches else 0)
        kernel_call()
        return [1.0] * len(quantiles)

    @triton.autotune([triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((64, 1), (128, 2), (256, 4))],
                     key=["n"], do_bench=timing, cache_results=True)
    @triton.jit
    def double(x, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x + offsets, tl.load(x + offsets, mask=offsets < n) * 2, mask=offsets < n)

    x = torch.arange(1000.0, device="cuda")
    with precompile_module.autotuner_compiles_side_by_side(threads=3) as patched:
        assert patched
        double[lambda meta: (triton.cdiv(1000, meta["BLOCK"]),)](x, 1000)
    assert compiled_at_first_timing == [3]
    # each configuration timed once (x doubled), then the chosen one launched
    torch.testing.assert_close(x, torch.arange(1000.0, device="cuda") * 16)


def test_a_worker_past_its_time_is_killed_with_the_processes_it_started(tmp_path):
    from rnnops._workers import run_side_by_side

    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time, pathlib; child = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); pathlib.Path(sys.argv[1]).write_text(str(child.pid)); time.sleep(60)")
    assert run_side_by_side(code, [str(pid_file)], 1, timeout_s=2.0) == [None]  # killed: no exit status
    state = pathlib.Path(f"/proc/{pid_file.read_text()}/status")

    def dead() -> bool:  # gone, or a zombie awaiting its reaper
        try:
            return "\tZ" in state.read_text()
        except OSError:
            return True

    deadline = time.monotonic() + 10  # a killed process still needs the CPU once to exit, on a busy machine
    while not dead() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dead()


def test_stale_extension_build_locks_are_removed(monkeypatch, tmp_path):
    old, new = tmp_path / "py312_cu130" / "flashrnn_old" / "lock", tmp_path / "py312_cu130" / "flashrnn_new" / "lock"
    for lock in (old, new):
        lock.parent.mkdir(parents=True)
        lock.touch()
    os.utime(old, (1000.0, 1000.0))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert precompile_module.clear_stale_build_locks(since=2000.0) == [new]
    assert old.exists() and not new.exists()


def test_precompile_warms_standard_cases_in_worker_processes(monkeypatch, tmp_path):
    """Workers find a case again by name among the standard cases; a name they cannot find (a
    tiny test case) is counted as not warmed."""
    standard = next(c for c in bench_cases.standard_cases(CPU) if c.name.startswith("scalar decay"))
    progress = []
    warmed = precompile([standard, tiny_cases()[0]], CPU, torch.float32, ["chunked"], 2, progress.append)
    assert (warmed.clean, warmed.stopped_in, progress[-1]) == (1, {}, "precompiling: 2/2 cases done, 0 running")
    assert warmed.seconds > 0
    monkeypatch.setattr(cli, "standard_cases", lambda device: [standard])
    main(["bench", "--backends", "chunked", "--repeats", "1", "--precompile", "1", "--out", str(tmp_path)])
    notes = json.loads((tmp_path / "results.json").read_text())["notes"]
    assert notes["precompiled"][0].startswith("1 of 1 cases warmed up in 1 processes")


def test_profile_lists_where_the_time_goes(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "standard_cases", lambda device: tiny_cases()[4:5])  # the GRU case
    main(["bench", "--repeats", "1", "--profile", "--backends", "reference", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    kernels = {row["target"]: row["kernels"] for row in rows}
    assert set(kernels) == {"reference", "torch.nn.GRU"}
    for top in kernels.values():
        assert 0 < len(top) <= 8 and all(k["seconds"] > 0 and 0 < k["share"] <= 1 for k in top)
        assert [k["seconds"] for k in top] == sorted((k["seconds"] for k in top), reverse=True)
    assert any("gru" in k["name"].lower() for k in kernels["torch.nn.GRU"])
    markdown = (tmp_path / "report.md").read_text()
    assert "## Where the time goes" in markdown and "| case | target | operator | calls | ms | share |" in markdown


def test_a_case_comparing_forwards_only_profiles_every_forward(monkeypatch, tmp_path):
    """Where a target's backward fails (fla's gated ops on Hopper with Triton 3.6), the case's
    comparison is its forwards: each row also gets its forward's largest operators, and the report
    a section for them; where every backward runs, nothing of the sort."""
    case = tiny_cases()[0]
    forward_only = Target("fla.chunk_simple_gla", "peer", lambda x: x, lambda x: (x["q"] * 2).detach(),
                          lambda out: out)
    ours = Target("chunked", "rnnops", lambda x: x, lambda x: case.run(x, "chunked"), lambda out: out)
    monkeypatch.setattr(runner, "targets_for", lambda *args, **kwargs: ([ours, forward_only], []))
    rows, notes = run_case(case, CPU, torch.float32, repeats=1, profile=True)
    assert [row["fwd_bwd"] is None for row in rows] == [False, True]
    assert any(note.startswith("fla.chunk_simple_gla: backward failed") for note in notes)
    for row in rows:
        top = row["kernels_fwd"]
        assert 0 < len(top) <= 8 and all(k["seconds"] > 0 and 0 < k["share"] <= 1 for k in top)
    assert any("mul" in k["name"] for k in rows[1]["kernels_fwd"])
    monkeypatch.setattr(cli, "standard_cases", lambda device: [case])
    main(["bench", "--repeats", "1", "--profile", "--out", str(tmp_path)])
    markdown = (tmp_path / "report.md").read_text()
    assert "## Where the forward's time goes" in markdown
    assert f"| {case.name} | fla.chunk_simple_gla | aten::mul" in markdown
    monkeypatch.setattr(runner, "targets_for", lambda *args, **kwargs: ([ours], []))
    (row,), _ = run_case(case, CPU, torch.float32, repeats=1, profile=True)
    assert "kernels" in row and "kernels_fwd" not in row


def test_host_breakdown_reads_as_the_call_chain_of_a_forward(monkeypatch, tmp_path):
    """On a GPU the profile also lists where a forward call's host time goes (launches are
    asynchronous there): here on the CPU, the chunked linear attention's call chain, then the
    report's section for a row that has it."""
    q, v = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 2, 16)

    def forward():
        return rnnops.linear_attn(q, q, v, backend="chunked")

    top = host_breakdown(forward, calls=3, top=6)
    assert len(top) == 6 and top[0]["name"].endswith("(linear_attn)") and top[0]["calls"] == 1
    assert all(0 < h["share"] <= 1 + 1e-9 for h in top)
    assert [h["seconds"] for h in top] == sorted((h["seconds"] for h in top), reverse=True)
    monkeypatch.setattr(cli, "standard_cases", lambda device: tiny_cases()[:1])
    main(["bench", "--repeats", "1", "--backends", "chunked", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    results["rows"][0]["host"] = top
    report.write_report(results, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "## Where a forward call's host time goes" in markdown and top[0]["name"] in markdown


def test_targets_slower_than_the_profile_limit_are_timed_but_not_profiled(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "standard_cases", lambda device: tiny_cases()[4:5])
    monkeypatch.setattr(runner, "PROFILE_LIMIT_S", 0.0)
    main(["bench", "--repeats", "1", "--profile", "--backends", "reference", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(row["fwd_bwd"] and "kernels" not in row for row in results["rows"])
    (notes,) = [notes for case, notes in results["notes"].items() if case == tiny_cases()[4].name]
    assert any(note.startswith("reference: not profiled (forward+backward") for note in notes)


def test_device_breakdown_counts_kernels_not_the_host_ranges_that_launched_them():
    from torch.autograd import DeviceType

    from rnnops.bench.timing import largest_entries

    def event(key, device_type, device_ms, cpu_ms=0.0):
        return SimpleNamespace(key=key, count=1, device_type=device_type, self_device_time_total=device_ms * 1e3,
                               self_cpu_time_total=cpu_ms * 1e3)

    averages = [event("LinearAttnFunctionBackward", DeviceType.CPU, 1.45, 0.2),
                event("dqk_kernel", DeviceType.CUDA, 0.9), event("dv_kernel", DeviceType.CUDA, 0.3),
                event("aten::copy_", DeviceType.CPU, 0.0, 0.1)]
    on_device = largest_entries(averages, True, 8)
    assert [(e["name"], round(e["share"], 2)) for e in on_device] == [("dqk_kernel", 0.75), ("dv_kernel", 0.25)]
    assert [e["name"] for e in largest_entries(averages, False, 1)] == ["LinearAttnFunctionBackward"]


def test_compare_prints_ratios(tmp_path, capsys):
    def results(seconds):
        timing = {"median_s": seconds, "spread": 0.0, "samples_s": [seconds]}
        return {"rows": [{"case": "c", "target": "chunked", "fwd": timing, "fwd_bwd": timing}]}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(results(0.004)))
    b.write_text(json.dumps(results(0.002)))
    main(["bench", "--compare", str(a), str(b)])
    out = capsys.readouterr().out
    assert "2.00x" in out and "geometric mean A/B over 2 timings: 2.000x" in out


def test_cases_runs_only_the_matching_cases(monkeypatch, tmp_path):
    cases = tiny_cases()[:3]
    ran = []
    monkeypatch.setattr(cli, "standard_cases", lambda device: cases)
    monkeypatch.setattr(cli, "run_case", lambda case, *args, **kwargs: (ran.append(case.name), ([], []))[1])
    main(["bench", "--repeats", "1", "--cases", f"^{re.escape(cases[1].name)}$", "--out", str(tmp_path)])
    assert ran == [cases[1].name]
    with pytest.raises(SystemExit, match="matches none of"):
        main(["bench", "--cases", "no such case"])
    with pytest.raises(SystemExit, match="not a regular expression"):
        main(["bench", "--cases", "GLA("])


def test_unknown_op_is_refused(monkeypatch):
    with pytest.raises(SystemExit, match="unknown op"):
        main(["bench", "--ops", "attention"])


def test_measure_respects_repeats_and_time_limits():
    calls = []
    timing = measure(lambda: calls.append(1), CPU, warmup=2, repeats=4)
    assert len(timing.samples) == 4 and len(calls) == 6
    slow = measure(lambda: sum(range(20000)), CPU, warmup=0, repeats=50, max_seconds=0.0)
    assert len(slow.samples) == 1
    assert timing.host_median is None  # host time is only its own measurement where launches are asynchronous


def test_gpu_batch_size_takes_the_default_unlimited_time():
    """The GPU path's batch size: an infinite max_seconds (measure's default) sets no cap, where
    floor(inf) raised OverflowError on the H100 (2026-11-26)."""
    assert batch_size(0.005, repeats=5, min_seconds=0.0, max_seconds=float("inf")) == 5
    assert batch_size(1e-4, repeats=5, min_seconds=0.3, max_seconds=2.0) == 100
    assert batch_size(0.1, repeats=5, min_seconds=0.3, max_seconds=2.0) == 5
    assert batch_size(0.5, repeats=5, min_seconds=0.3, max_seconds=2.0) == 4
    assert batch_size(3.0, repeats=5, min_seconds=0.3, max_seconds=2.0) == 1


def test_a_slow_first_call_does_not_size_the_batch():
    """A first call that compiled (a second here, 3 ms after) is timed again before the batch is
    sized, where it would have left one sample; a call that is slow every time is not repeated for
    nothing more than its estimate (once more at most)."""
    first_compiles = iter([1.2, 0.003, 0.003])
    estimate = call_estimate(lambda: next(first_compiles), repeats=5, max_seconds=2.0)
    assert estimate == 0.003 and batch_size(estimate, repeats=5, min_seconds=0.3, max_seconds=2.0) == 100
    calls = []
    assert call_estimate(lambda: calls.append(1) or 0.1, repeats=5, max_seconds=2.0) == 0.1 and len(calls) == 1
    slow = iter([3.0, 3.1])
    assert call_estimate(lambda: next(slow), repeats=5, max_seconds=2.0) == 3.0


@pytest.mark.gpu
def test_gpu_timing_runs_calls_back_to_back():
    """A call's host work hides behind the previous call's kernels, as in triton.testing.do_bench:
    2 ms of host sleep per call does not show in the times of calls with 1e7 cycles of GPU sleep (5-6
    ms), but is measured as host time; with more host than GPU time, the host shows. Blocking
    launches (CUDA_LAUNCH_BLOCKING=1, as the GPU suite runs the other GPU tests) serialise host and
    GPU, so the suite runs this test alone without them."""
    if os.environ.get("CUDA_LAUNCH_BLOCKING", "0") != "0":
        pytest.skip("CUDA_LAUNCH_BLOCKING is set: launches wait for their kernels, nothing can overlap")
    cuda = torch.device("cuda")
    cycles = int(1e7)

    def gpu_only():
        torch.cuda._sleep(cycles)

    def host_and_gpu(host_s):
        def call():
            time.sleep(host_s)
            torch.cuda._sleep(cycles)
        return call

    gpu = measure(gpu_only, cuda, repeats=5).median
    overlapped = measure(host_and_gpu(0.002), cuda, repeats=5)
    assert overlapped.median < gpu + 0.001 and overlapped.host_median >= 0.002
    host_bound = measure(host_and_gpu(gpu + 0.005), cuda, repeats=5).median
    assert host_bound > gpu + 0.004


def test_report_shows_the_forward_host_time_where_measured(tmp_path):
    def timing(seconds, host):
        return {"median_s": seconds, "spread": 0.0, "samples_s": [seconds], "host_median_s": host}

    rows = [{"op": "linear_attn", "case": "c", "target": target, "oracle": "chunked", "kind": "rnnops", "rel_err": 0.0,
             "mismatch": False,
             "fwd": timing(7e-4, host), "fwd_bwd": timing(2e-3, None)}
            for target, host in (("chunked", None), ("triton", 4.2e-4))]
    results = {"environment": {}, "device": "cuda:0", "dtype": "bfloat16", "rows": rows, "notes": {}}
    report.write_report(results, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "| fwd ms | fwd host ms |" in markdown
    assert "| c | triton | 0.7 | 0.42 | 2 |" in markdown and "| c | chunked | 0.7 | - | 2 |" in markdown
    for row in rows:  # a CPU run: no host times, no column
        row["fwd"]["host_median_s"] = None
    report.write_report(results, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "| fwd host ms |" not in markdown and "| c | triton | 0.7 | 2 |" in markdown


def test_headline_compares_each_phase_where_both_sides_have_it():
    """A peer whose backward failed still meets us on the forward; throughput cells it lacks read '-'."""
    def timing(seconds):
        return {"median_s": seconds, "spread": 0.0, "samples_s": [seconds], "host_median_s": None}

    def row(target, kind, fwd, fwd_bwd):
        return {"op": "delta_rule", "case": "c", "target": target, "oracle": "chunked", "kind": kind, "rel_err": 0.0,
                "mismatch": False, "fwd": timing(fwd), "fwd_bwd": None if fwd_bwd is None else timing(fwd_bwd)}

    results = {"environment": {}, "device": "cuda:0", "dtype": "bfloat16", "notes": {},
               "rows": [row("chunked", "rnnops", 9e-3, 3e-2), row("triton", "rnnops", 2e-3, 6e-3),
                        row("fla.chunk_gated_delta_rule", "peer", 1e-3, None)]}
    assert report.headline(results) == [("c", "2 (triton)", "1 (fla.chunk_gated_delta_rule)", "0.50x", "-", "-", "-")]
    results["rows"][2]["fwd_bwd"] = timing(1.2e-2)
    assert report.headline(results)[0][4:] == ("6 (triton)", "12 (fla.chunk_gated_delta_rule)", "2.00x")
    results["rows"][2]["fwd_bwd"] = None
    markdown = report.render_markdown(report.blocks(results, {}))
    assert "| c | fla.chunk_gated_delta_rule | 1 | - |" in markdown and "| - | - | - | - |" in markdown


def test_peak_memory_counts_live_tensors():
    def two_alive_at_once():
        a = torch.ones(1_000_000)
        b = a * 2
        del a
        return (b + 1).sum()

    assert 8_000_000 <= peak_memory(two_alive_at_once, CPU) < 8_100_000


def stored_result(timing: float) -> dict:
    """An autotuning result as Triton's Autotuner stores it (cache_results)."""
    return {"key": [64, "torch.bfloat16"], "configs_timings": [[{"kwargs": {"BV": 32}, "num_warps": 4}, [timing]]]}


def test_peer_choices_round_trip_through_results_files(tmp_path):
    from rnnops.bench import peer_choices

    first = tmp_path / "machine-1"
    (first / "HASH1").mkdir(parents=True)
    (first / "HASH1" / "chunk_fwd_kernel_o.autotune.json").write_text(json.dumps(stored_result(1.0)))
    (first / "HASH1" / "chunk_fwd_kernel_o.json").write_text("{}")  # a compiled kernel's metadata: not a choice
    (first / "HASH2").mkdir()
    (first / "HASH2" / "broken.autotune.json").write_text("{not json")  # being written: left out
    collected = peer_choices.collect(first)
    assert collected == {"HASH1/chunk_fwd_kernel_o.autotune.json": stored_result(1.0)}

    older, newer = tmp_path / "older.json", tmp_path / "newer.json"
    older.write_text(json.dumps({"rows": [], "peer_autotune": dict(collected, **{"HASH3/x.autotune.json":
                                                                                 stored_result(3.0)})}))
    newer.write_text(json.dumps({"rows": [], "peer_autotune": {"HASH1/chunk_fwd_kernel_o.autotune.json":
                                                               stored_result(2.0)}}))
    merged = peer_choices.from_results([older, newer])
    assert merged == {"HASH1/chunk_fwd_kernel_o.autotune.json": stored_result(2.0),  # the later file's
                      "HASH3/x.autotune.json": stored_result(3.0)}

    second = tmp_path / "machine-2"
    (second / "HASH3").mkdir(parents=True)
    (second / "HASH3" / "x.autotune.json").write_text(json.dumps(stored_result(9.0)))  # its own: kept
    assert peer_choices.restore(merged, second) == 1
    assert peer_choices.collect(second) == {"HASH1/chunk_fwd_kernel_o.autotune.json": stored_result(2.0),
                                            "HASH3/x.autotune.json": stored_result(9.0)}


@pytest.mark.parametrize("choices,message", [
    ({"../escape.autotune.json": stored_result(1.0)}, "is not named"),
    ({"a/b/deep.autotune.json": stored_result(1.0)}, "is not named"),
    ({"HASH/kernel.json": stored_result(1.0)}, "is not named"),
    ({"HASH/kernel.autotune.json": {"key": []}}, "no configs_timings"),
    ([1, 2], "must be an object"),
])
def test_peer_choices_refuse_what_triton_would_not_have_written(tmp_path, choices, message):
    from rnnops.bench import peer_choices

    with pytest.raises(ValueError, match=message):
        peer_choices.restore(choices, tmp_path)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"peer_autotune": choices}))
    with pytest.raises(ValueError, match=f"{re.escape(str(results))}: .*{message}"):
        peer_choices.from_results([results])
    assert not any(tmp_path.glob("**/*.autotune.json"))


def test_bench_restores_peer_choices_before_running_and_notes_a_bad_file(monkeypatch, tmp_path):
    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    monkeypatch.setattr(cli, "standard_cases", lambda device: tiny_cases()[:1])
    monkeypatch.setattr(cli, "run_case", lambda case, *args, **kwargs: ([], []))
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"peer_autotune": {"HASH/k.autotune.json": stored_result(1.0)}}))
    main(["bench", "--repeats", "1", "--peer-choices-from", str(earlier), "--out", str(tmp_path / "a")])
    assert json.loads((cache / "HASH" / "k.autotune.json").read_text()) == stored_result(1.0)
    notes = json.loads((tmp_path / "a" / "results.json").read_text())["notes"]
    assert notes["peer choices"] == ["1 stored autotuning choices of the peers restored from 1 earlier results file(s)"]
    main(["bench", "--repeats", "1", "--peer-choices-from", str(tmp_path / "missing.json"), "--out", str(tmp_path / "b")])
    notes = json.loads((tmp_path / "b" / "results.json").read_text())["notes"]
    assert notes["peer choices"][0].startswith("not restored: ") and "missing.json" in notes["peer choices"][0]


NCU_LOG = '''==PROF== Connected to process 123 (/usr/bin/python3.12)
==PROF== Profiling "scan_fwd_kernel": 0%....50%....100% - 9 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","gpu__time_duration.sum",\
"sm__throughput.avg.pct_of_peak_sustained_elapsed","launch__registers_per_thread",\
"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio"
"","","","","","","","usecond","%","register/thread","ratio","ratio","ratio"
"0","123","python3.12","host","void rnnops::scan::selective_scan_fwd<__nv_bfloat16, 4, 8, true>(const T1 *, Operand)",\
"1","7","1,234.5","61.3","128","0.5","7.25","2.5"
"1","123","python3.12","host","scan_bwd_kernel","1","7","500","12","246","3","0.25","-"
==PROF== Disconnected from process 123
'''


def test_kernel_profile_summary_reads_ncu_raw_logs(tmp_path):
    """ncu's --csv --page raw log as a table: ncu's own lines skipped, a kernel's template arguments
    and parameters dropped, thousands separators and time units read, the stall reasons ranked, a
    metric the log lacks or cannot give shown as '-'."""
    from rnnops.bench import kernel_profile

    log = tmp_path / "ncu-1.csv"
    log.write_text(NCU_LOG)
    table = kernel_profile.summary_table(log)
    assert table.startswith("ncu-1: 2 kernels, 1734 us")
    rows = [line for line in table.splitlines() if line.startswith("| ") and line.split()[1] not in ("kernel", "---")]
    first, second = ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)
    assert first[0] == "void rnnops::scan::selective_scan_fwd" and first[1] == "1234.5"
    assert first[2] == "61" and first[3] == "-" and first[8] == "128"
    assert first[-1] == "long_scoreboard 7.2, short_scoreboard 2.5, barrier 0.5"
    assert second[0] == "scan_bwd_kernel" and second[-1] == "barrier 3, long_scoreboard 0.25"
    (tmp_path / "empty.csv").write_text("==PROF== Connected to process 9\n")
    assert "no profiled kernels" in kernel_profile.summary_table(tmp_path / "empty.csv")


def test_kernel_profile_run_needs_a_gpu_and_one_case(monkeypatch):
    from rnnops.bench import kernel_profile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        kernel_profile.main(["run", "--case", "Mamba-1 B8 T2048", "--target", "cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="must find one case, found 'Mamba-1 B8 T2048 D2048 N16', "):
        kernel_profile.main(["run", "--case", "Mamba-1 B8 T2048", "--target", "cuda"])
