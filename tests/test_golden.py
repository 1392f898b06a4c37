"""Golden trajectories and an old checkpoint: no change alters a number without saying so.

`tests/golden/record.py` wrote `trajectories.json` (see its docstring); `resume_run/` is the
checkpoint the code before the trainer redesign wrote. Each golden run runs in its own process
with XLA's CPU code pinned (`GOLDEN_XLA_FLAGS`: no YNNPACK fusions, code generation capped at
AVX2), so every train metric of every step and the final evaluation must be bit-identical on
any x86-64 CPU with AVX2, whatever its model name.
"""

from __future__ import annotations

import json
import os

import pytest
from golden.record import (
    GOLDEN_XLA_FLAGS,
    pinned_isa_available,
    resume_committed,
    run_pinned,
    trajectory,
)

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")

pinned = pytest.mark.skipif(
    not pinned_isa_available(), reason="the pinned golden code needs an x86-64 CPU with AVX2"
)


@pytest.fixture(scope="module")
def record():
    with open(os.path.join(HERE, "trajectories.json")) as f:
        recorded = json.load(f)
    # A record made with other flags would compare other code: record it again.
    assert recorded["xla_flags"] == GOLDEN_XLA_FLAGS
    return recorded


def _assert_same(got: dict, want: dict) -> None:
    assert len(got["train"]) == len(want["train"])
    assert len(got["eval"]) == len(want["eval"])
    for kind in ("train", "eval"):
        for g, w in zip(got[kind], want[kind], strict=True):
            assert g.keys() >= w.keys(), (kind, sorted(set(w) - set(g)))
            for key, value in w.items():
                assert g[key] == value, (kind, g["step"], key, g[key], value)


@pinned
@pytest.mark.parametrize("name", ["default", "cifar100_w2a2_tiny"])
def test_runs_match_the_record(name, record, tmp_path):
    run_pinned(name, str(tmp_path))
    _assert_same(trajectory(str(tmp_path)), record["runs"][name])


@pinned
def test_a_checkpoint_written_before_the_redesign_resumes(record, tmp_path):
    """The committed run stopped after step 3 of 6; resuming it trains steps 4 to 6 and
    evaluates, exactly as recorded."""
    got = resume_committed(str(tmp_path / "run"))
    assert [r["step"] for r in got["train"]] == [1, 2, 3, 4, 5, 6]  # 1 to 3: the committed run's
    _assert_same(got, record["runs"]["resume_of_committed"])


def test_a_config_recorded_before_stage_fields_were_typed_still_matches():
    """Stage fields are typed now (``epochs`` a float): a run recorded with ``epochs=80`` must
    not be refused as "a different config" when the same config records 80.0."""
    from lbq.configs import cifar100_w2a2
    from lbq.workdir import config_differences

    new = json.loads(cifar100_w2a2.get_config().to_json_best_effort())
    old = json.loads(json.dumps(new))
    for entry in old["stages"]:
        entry["epochs"] = int(entry["epochs"])
    assert isinstance(old["stages"][0]["epochs"], int) and new["stages"][0]["epochs"] == 80.0
    assert config_differences(old, new) == []
    old["stages"][0]["epochs"] = 81
    assert config_differences(old, new) == ["stages[0].epochs: 81 -> 80.0"]
