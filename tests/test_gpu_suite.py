"""bench/gpu_suite.sh's A/B checks, read without a GPU: each names ops the tuner has, shapes those
ops take (the tuner ranks them as a dry run does) and changes to fields of their configurations,
so that no device time goes to a check that can only answer "not tried"."""
import json
import shlex
from pathlib import Path

import pytest
import torch

from rnnops.autotune import hardware, kernels, tuner

SUITE = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.sh"


def ab_checks() -> list[dict]:
    """Each A/B check of the suite (`ab SHARE OP ARGS`: autotune --ops OP ARGS for SHARE percent of the
    A/B checks' time): share, ops, shapes, tries."""
    text = SUITE.read_text().replace("\\\n", " ")
    checks = []
    for line in text.splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith("ab ") else []
        if "--try" not in words:
            continue
        options, current = {"--ops": [words[2]]}, None
        for word in words[3:]:
            if word.startswith("--"):
                current = options.setdefault(word, [])
            elif current is not None:
                current.append(word)
        checks.append({"share": int(words[1]), "ops": options["--ops"], "shapes": options["--shapes"],
                       "tries": [json.loads(t) for t in options["--try"]]})
    return checks


def test_the_suite_has_ab_checks():
    assert len(ab_checks()) >= 5


def test_ab_shares_spend_the_whole_window():
    """The last check ends where the A/B checks' time does (569 s into the call), no earlier."""
    assert sum(check["share"] for check in ab_checks()) == 100


@pytest.mark.parametrize("check", ab_checks(), ids=lambda c: " ".join(c["ops"]) + " " + c["shapes"][0])
def test_ab_check_names_shapes_and_fields_its_ops_take(check):
    tunables = kernels.tunables(check["ops"])
    assert tunables, check["ops"]
    for shape_text in check["shapes"]:
        shape = tuner.parse_shape(shape_text)
        for tunable in tunables:
            kernels.check_shape(tunable.op, shape)
            count, ranked = tuner.rank(tunable, shape, torch.bfloat16, hardware.named("H100"))
            assert count and ranked, (tunable.op, tunable.backend, shape_text)
    fields = [set(tunable.default()) for tunable in tunables]
    for change in check["tries"]:
        assert any(set(change) <= f for f in fields), f"{change}: no backend of {check['ops']} has these fields"
