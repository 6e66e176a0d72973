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
    assert re.search(r"^2 cases, 0 failing, \d+ s$", capsys.readouterr().out, re.MULTILINE)


def test_a_failure_compares_the_other_backends_and_reproduces(monkeypatch, capsys):
    monkeypatch.setitem(fuzz.BOUNDS, "triton", 0.0)  # every case fails
    assert fuzz.main(["--cases", "1", "--families", "rnn-triton", "--seed", "3"]) == 1
    line = capsys.readouterr().out.splitlines()[0]
    record = json.loads(line)
    assert record["family"] == "rnn-triton" and set(record["errors"]) == {"triton", "cuda"}
    assert float(record["errors"]["cuda"]["output 0"]) < 1e-5
    assert fuzz.main(["--repro", line]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == record["errors"]
    with pytest.raises(SystemExit):
        fuzz.main(["--families", "nonsense"])
