"""The trainer redesign left every number unchanged: golden trajectories and an old checkpoint.

`tests/golden/record.py` wrote `trajectories.json` and `resume_run/` with the code before the
redesign (see its docstring). Every train metric of every step and the final evaluation must
be bit-identical on the CPU that recorded them; on another CPU model, XLA may pick other
kernels, so the comparison there allows float32 rounding noise.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from golden.record import golden_configs, resume_config, trajectory

from lbq.bench import cpu_model
from lbq.train import train_and_evaluate

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


@pytest.fixture(scope="module")
def record():
    with open(os.path.join(HERE, "trajectories.json")) as f:
        return json.load(f)


def _assert_same(got: dict, want: dict, exact: bool) -> None:
    assert len(got["train"]) == len(want["train"])
    assert len(got["eval"]) == len(want["eval"])
    for kind in ("train", "eval"):
        for g, w in zip(got[kind], want[kind], strict=True):
            assert g.keys() >= w.keys(), (kind, sorted(set(w) - set(g)))
            for key, value in w.items():
                if exact or not isinstance(value, float):
                    assert g[key] == value, (kind, g["step"], key, g[key], value)
                else:
                    assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (kind, key)


@pytest.mark.parametrize("name", ["default", "cifar100_w2a2_tiny"])
def test_runs_match_the_record_of_the_code_before_the_redesign(name, record, tmp_path):
    train_and_evaluate(golden_configs()[name], str(tmp_path))
    _assert_same(trajectory(str(tmp_path)), record["runs"][name], cpu_model() == record["cpu"])


def test_a_checkpoint_written_before_the_redesign_resumes(record, tmp_path):
    """The committed run stopped after step 3 of 6; resuming it gives the uninterrupted run's
    steps 4 to 6 and final evaluation."""
    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(HERE, "resume_run"), workdir)
    result = train_and_evaluate(resume_config(), str(workdir))
    assert result.status == "completed" and result.step == 6
    want = record["runs"]["resume_uninterrupted"]
    _assert_same(trajectory(str(workdir)), want, cpu_model() == record["cpu"])


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
