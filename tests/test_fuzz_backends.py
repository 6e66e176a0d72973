"""bench/fuzz_backends.py: its cases run, a failure's line reproduces it, and a failure lists the
op's other backends on the same inputs."""
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

if torch.cuda.is_available():  # before loading it: its import sets TRITON_INTERPRET and RNNOPS_CUDA_SIMULATOR
    # for the whole process, which on a GPU machine turned every later-imported Triton kernel into
    # the interpreter's (62 GPU tests failed that way on 2026-11-28)
    pytest.skip("its cases run CPU tensors (interpreter, simulator)", allow_module_level=True)

_PATH = Path(__file__).resolve().parents[1] / "bench" / "fuzz_backends.py"
_SPEC = importlib.util.spec_from_file_location("fuzz_backends", _PATH)
fuzz = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fuzz)


def test_cases_pass_and_report(capsys):
    assert fuzz.main(["--cases", "2", "--families", "rnn-triton", "--seed", "3"]) == 0
    assert re.search(r"^2 cases, 0 failing, 0 at float32's limit, \d+ s$", capsys.readouterr().out, re.MULTILINE)


def test_a_failure_compares_the_other_backends_and_reproduces(monkeypatch, capsys):
    monkeypatch.setitem(fuzz.BOUNDS, "triton", 0.0)  # every case fails
    monkeypatch.setattr(fuzz, "verdict", lambda *args: "bug")
    assert fuzz.main(["--cases", "1", "--families", "rnn-triton", "--seed", "3"]) == 1
    line = capsys.readouterr().out.splitlines()[0]
    record = json.loads(line)
    assert record["verdict"] == "bug"
    assert record["family"] == "rnn-triton" and set(record["errors"]) == {"triton", "cuda"}
    assert float(record["errors"]["cuda"]["output 0"]) < 1e-5
    assert fuzz.main(["--repro", line]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == record["errors"]
    with pytest.raises(SystemExit):
        fuzz.main(["--families", "nonsense"])


def test_a_failure_at_float32s_limit_is_counted_apart(monkeypatch, capsys):
    monkeypatch.setitem(fuzz.BOUNDS, "triton", 0.0)
    monkeypatch.setattr(fuzz, "verdict", lambda *args: "float32 limit")
    assert fuzz.main(["--cases", "1", "--families", "rnn-triton", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[0])["verdict"] == "float32 limit"
    assert re.search(r"^1 cases, 0 failing, 1 at float32's limit, \d+ s$", out, re.MULTILINE)


def test_verdict_calls_it_a_bug_where_another_backend_resolves_the_quantity():
    """The scan-cuda case of 2026-11-28 (seed 712620323): dD off in every backend alike, a sum
    float32 cannot resolve; the gated DeltaProduct's dg before TOKEN_PAIRS: chunked 2000x closer."""
    assert fuzz.verdict({"d/dD": 1.7e-5, "d/du": 1e-7}, [{"d/dD": 1.5e-5}, {"d/dD": 1.3e-5}], 1e-5) == "float32 limit"
    assert fuzz.verdict({"d/dg": 3.3e-4}, [{"d/dg": 1.4e-7}], 1e-4) == "bug"
    assert fuzz.verdict({"d/dg": 3.3e-4}, ["RuntimeError: no kernel"], 1e-4) == "bug"  # nothing to compare
    assert fuzz.verdict("ValueError: refused", [{"d/dg": 1e-7}], 1e-4) == "bug"
    assert fuzz.verdict({"d/dg": float("inf")}, [{"d/dg": float("inf")}], 1e-4) == "bug"
    assert fuzz.verdict({"d/dg": 5e-5, "d/dq": 3e-4}, [{"d/dg": 1e-8, "d/dq": 2e-4}], 1e-4) == "float32 limit"
