"""The bench harness end to end on tiny cases (the real --quick run is the README's main job)."""
import json

import torch

import rnnops
from rnnops.__main__ import main
from rnnops.bench import cases as bench_cases
from rnnops.bench import cli
from rnnops.bench.timing import measure


def tiny_cases():
    return [
        bench_cases._linear_attn_case("per-key", 1, 20, 2, 8, 8),
        bench_cases._delta_case(2, True, 1, 12, 2, 8, 8),
        bench_cases._selective_scan_case(1, 16, 8, 4),
        bench_cases._rnn_module_case("gru", 2, 6, 8),
    ]


def test_every_standard_case_builds_and_runs_every_target_on_tiny_inputs(monkeypatch):
    """Standard cases at their real shapes are too slow for a test; check their code paths
    on shrunken copies of each family instead, and that the standard list covers all families."""
    families = {case.op for case in bench_cases.standard_cases()}
    assert families == {"linear_attn", "delta_rule", "delta_product", "selective_scan", "rnn"}
    for case in tiny_cases():
        rows = cli.run_case(case, torch.device("cpu"), torch.float32, None, repeats=1, log=lambda m: None)
        assert {r["target"] for r in rows} == set(case.targets)
        for row in rows:
            assert row["rel_err"] < 1e-5, row
            assert row["fwd"].median > 0 and row["fwd_bwd"].median > 0


def test_cli_writes_results_that_parse_back(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "standard_cases", tiny_cases)
    assert main(["bench", "--quick", "--ops", "linear_attn", "rnn", "--repeats", "1", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "linear_attn" in table and "torch.nn.GRU" in table and "x base" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["rnnops"] == rnnops.__version__
    targets = {(r["op"], r["target"]) for r in results["rows"]}
    assert targets == {("linear_attn", "reference"), ("linear_attn", "chunked"), ("rnn", "torch.nn.GRU"),
                       ("rnn", "reference")}
    for row in results["rows"]:
        assert row["fwd"]["median_s"] > 0 and len(row["fwd_bwd"]["samples_s"]) >= 1


def test_backend_filter_keeps_baseline_and_peers():
    la, _, _, gru = tiny_cases()
    assert cli._targets(la, ["chunked"]) == ["reference", "chunked"]
    assert cli._targets(la, ["reference"]) == ["reference"]
    assert cli._targets(gru, ["chunked"]) == ["torch.nn.GRU"]
    assert cli._targets(gru, None) == ["torch.nn.GRU", "reference"]


def test_measure_respects_repeats_and_time_limits():
    calls = []
    timing = measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=4)
    assert len(timing.samples) == 4 and len(calls) == 6
    slow = measure(lambda: sum(range(20000)), torch.device("cpu"), warmup=0, repeats=50, max_seconds=0.0)
    assert len(slow.samples) == 1
