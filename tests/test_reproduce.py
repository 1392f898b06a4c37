"""The reproduction runner: equal budgets, a tiny end-to-end study, and resuming by skipping."""

import json
import os

import jax
import numpy as np
import pytest

from lbq.experiments import reproduce

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it


@pytest.mark.parametrize("bits", [2, 4])
def test_every_method_gets_the_same_number_of_steps(bits):
    from lbq.configs import default

    base = default.get_config()
    for total in (4, 58, 200):
        for method in reproduce.METHODS:
            run = reproduce.StudyRun(method, 32 if method == "fp" else bits, 0)
            config = reproduce.run_config(base, run, total)
            assert sum(s.steps for s in config.stages) == total
            assert all(s.epochs is None for s in config.stages)
            # every quantized method ends at the target precision
            last = config.stages[-1]
            want = 32 if method == "fp" else bits
            assert (last.w_bits, last.a_bits) == (want, want)
            assert config.distill.enabled == (method in ("kd", "best"))
            assert config.stochastic.enabled == (method == "sp")
            assert config.model.quantized == (method != "fp")


def test_ladders_decrease():
    assert [w for w, *_ in reproduce.stage_plan("pq", 2)] == [32, 8, 4, 2]
    assert [w for w, *_ in reproduce.stage_plan("pq", 4)] == [32, 8, 4]
    assert [w for w, *_ in reproduce.stage_plan("best", 2)] == [32, 4, 2]
    assert [(w, a) for w, a, *_ in reproduce.stage_plan("ts", 2)] == [(2, 32), (2, 2)]


def test_split_steps_gives_every_stage_a_step():
    # rounded cumulative ends: 23.2, 34.8, 46.4 -> 23, 35, 46
    assert reproduce.split_steps(58, [0.4, 0.2, 0.2, 0.2]) == [23, 12, 11, 12]
    # rounding alone would leave a stage empty (ends 1.6, 2.4 -> 2, 2): one step each
    assert reproduce.split_steps(4, [0.4, 0.2, 0.2, 0.2]) == [1, 1, 1, 1]
    assert reproduce.split_steps(3, [0.4, 0.3, 0.3]) == [1, 1, 1]
    with pytest.raises(ValueError, match="too few"):
        reproduce.split_steps(2, [0.4, 0.2, 0.2, 0.2])


def test_tiny_study_writes_outputs_and_skips_finished_runs(tmp_path, capsys):
    outdir = tmp_path / "study"
    args = [
        "--preset=tiny",
        f"--outdir={outdir}",
        "--methods=direct,ts",
        "--bits=2",
        "--seeds=0",
        f"--compile_cache={tmp_path / 'cache'}",  # ts reuses direct's compiled train step
    ]
    assert reproduce.main(args) == 0
    names = ["direct_w2a2_s0", "ts_w2a2_s0"]
    results = {}
    for name in names:
        with open(outdir / name / "result.json") as f:
            results[name] = json.load(f)
        assert results[name]["steps"] == 4
        assert 0.0 <= results[name]["top1"] <= 1.0
    assert [s["w_bits"] for s in results["ts_w2a2_s0"]["stages"]] == [2, 2]
    assert [s["a_bits"] for s in results["ts_w2a2_s0"]["stages"]] == [32, 2]

    table = (outdir / "results.md").read_text()
    for name, method in zip(names, ("direct", "ts"), strict=True):
        assert f"| {method} | {100 * results[name]['top1']:.1f} (n=1) |" in table
    assert "same total number of training steps" in table
    png = (outdir / "accuracy_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    mtimes = {n: os.path.getmtime(outdir / n / "result.json") for n in names}
    capsys.readouterr()
    assert reproduce.main(args) == 0
    out = capsys.readouterr().out
    assert "2 runs (2 finished, 0 to do)" in out
    assert "[1/2]" not in out  # nothing was trained again
    assert {n: os.path.getmtime(outdir / n / "result.json") for n in names} == mtimes


def test_dry_run_lists_runs_without_training(tmp_path, capsys):
    args = ["--preset=tiny", f"--outdir={tmp_path}", "--bits=2,4", "--seeds=0,1", "--dry_run"]
    assert reproduce.main(args) == 0
    out = capsys.readouterr().out
    assert "26 runs (0 finished, 26 to do)" in out
    assert "best_w2a2_s1: w32a32:2 -> w4a4:1 -> w2a2:1 +kd" in out
    assert not any(p.name.endswith("_s0") for p in tmp_path.iterdir())


def test_pretrained_plans_drop_the_32_bit_stage():
    plan = reproduce.stage_plan("pq", 2, fine_tune_lr=0.02, pretrained=True)
    assert [(w, a) for w, a, *_ in plan] == [(8, 8), (4, 4), (2, 2)]
    assert [f for *_, f, _ in plan] == pytest.approx([1 / 3] * 3)
    assert {lr for *_, lr in plan} == {0.02}
    assert [w for w, *_ in reproduce.stage_plan("best", 2, pretrained=True)] == [4, 2]
    assert reproduce.stage_plan("fp", 32, 0.02, pretrained=True) == [(32, 32, 1.0, 0.02)]
    assert reproduce.stage_plan("ts", 2, 0.02, pretrained=True) == [
        (2, 32, 0.5, 0.02),
        (2, 2, 0.5, 0.02),
    ]


def test_last_stage_share_gives_the_target_bit_width_its_fraction():
    plan = reproduce.stage_plan("pq", 2, 0.02, pretrained=True, last_stage_share=0.8)
    assert [w for w, *_ in plan] == [8, 4, 2]
    assert [f for *_, f, _ in plan] == pytest.approx([0.1, 0.1, 0.8])
    scratch = reproduce.stage_plan("best", 2, last_stage_share=0.5)  # 32 -> 4 -> 2 = 40/30/30
    assert [f for *_, f, _ in scratch] == pytest.approx([0.5 * 4 / 7, 0.5 * 3 / 7, 0.5])
    assert reproduce.stage_plan("direct", 2, last_stage_share=0.8) == [(2, 2, 1.0, None)]
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--outdir=x", "--last_stage_share=1.0"])


def test_set_overrides_a_field_of_every_run_after_the_method(capsys):
    from lbq.configs import default

    args = reproduce.parse_args(
        ["--outdir=x", "--set=distill.student_ce=0", "--set=distill.temperature=2.0"]
    )
    assert args.set == {"distill.student_ce": 0, "distill.temperature": 2.0}
    run = reproduce.StudyRun("kd", 2, 0)
    config = reproduce.run_config(default.get_config(), run, 8, overrides=args.set)
    assert config.distill.enabled  # the method's own setting stays
    assert config.distill.student_ce == 0.0 and config.distill.temperature == 2.0
    plain = reproduce.run_config(default.get_config(), run, 8)
    assert plain.distill.student_ce == 0.7  # SPEC's weight, which kd sets
    for flag, message in (
        ("--set=distill.student_cee=0", "distill.student_cee is not a config field"),
        ("--set=distill=0", "distill is not a config field"),
        ("--set=distill.enabled='yes'", "distill.enabled='yes': a str, but the field holds a bool"),
        ("--set=seed", "expected FIELD=VALUE"),
    ):
        with pytest.raises(SystemExit):
            reproduce.parse_args(["--outdir=x", flag])
        assert message in capsys.readouterr().err, flag


@pytest.fixture(scope="module")
def fp_and_kd_studies(tmp_path_factory):
    """Two tiny studies: a full-precision run, and a kd run started from it at lr 0 (so its
    weights stay the loaded ones)."""
    root = tmp_path_factory.mktemp("studies")
    common = ["--preset=tiny", "--seeds=0", f"--compile_cache={root / 'cache'}"]
    assert reproduce.main([*common, f"--outdir={root / 'fp'}", "--methods=fp"]) == 0
    start = root / "fp" / "fp_w32a32_s0"
    args = [f"--outdir={root / 'ft'}", "--methods=kd", "--bits=2", "--fine_tune_lr=0"]
    assert reproduce.main([*common, *args, f"--start_from={start}"]) == 0
    return root


def test_start_from_loads_the_trained_model_into_student_and_teacher(fp_and_kd_studies):
    from lbq.checkpoint import load_variables

    root = fp_and_kd_studies
    start = root / "fp" / "fp_w32a32_s0"
    started = load_variables(str(root / "ft" / "kd_w2a2_s0"))
    trained = load_variables(str(start))["student"]["params"]
    for network in ("student", "teacher"):
        jax.tree.map(np.testing.assert_array_equal, started[network]["params"], trained)
    with open(root / "ft" / "kd_w2a2_s0" / "result.json") as f:
        assert [s["w_bits"] for s in json.load(f)["stages"]] == [2]
    table = (root / "ft" / "results.md").read_text()
    assert "starts from the full-precision run" in table
    assert f"- `kd`: {reproduce.PRETRAINED_NOTES['kd']}" in table
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--outdir=x", f"--start_from={root / 'missing'}"])
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--outdir=x", f"--teacher_start_from={start}"])
    with pytest.raises(SystemExit):  # the rule is LSQ's: DoReFa weights are refused
        reproduce.parse_args(["--outdir=x", "--weight_range_at_bit_change=lsq_rule"])


def test_compare_puts_each_study_beside_the_control(fp_and_kd_studies, tmp_path):
    """lbq.experiments.compare on a finished control and study: the table, the strict JSON
    and the plot carry each run's top-1 and its difference to the control; bad input is
    refused in one line."""
    from lbq.experiments import compare

    control, study, out = fp_and_kd_studies / "fp", fp_and_kd_studies / "ft", tmp_path / "cmp"
    args = [f"--out={out}", f"--control={control}", f"--study=kd|run={study}", "--gaps=1"]
    assert compare.main(args) == 0
    fp = 100 * json.loads((control / "fp_w32a32_s0" / "result.json").read_text())["top1"]
    kd_run = json.loads((study / "kd_w2a2_s0" / "result.json").read_text())
    kd = 100 * kd_run["top1"]
    text = (out / "comparison.json").read_text()
    result = json.loads(text, parse_constant=lambda name: pytest.fail(f"not strict JSON: {name}"))
    assert result["columns"] == [["kd", 2]]
    split = kd_run["stages"][-1]["eval_split"]
    assert result["budgets"] == [f"{kd_run['steps']} steps, evaluated on {split}"]
    cell = result["studies"]["kd|run"]["kd w2a2"]
    assert (cell["n"], cell["seeds"], cell["top1"], cell["std"]) == (
        1,
        [0],
        [pytest.approx(kd)],
        None,
    )
    assert cell["delta"] == pytest.approx(kd - fp)
    table = (out / "comparison.md").read_text()
    assert f"| kd&#124;run | {kd:.2f} (n=1), {kd - fp:+.2f} |" in table
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    bad = [
        ["--study=no-label"],
        [f"--study=empty={tmp_path / 'missing'}"],
        [f"--study=a={study}", f"--study=a={study}"],  # one label twice
        [f"--study=fp={control}"],  # no quantized run
        [f"--study=a={study}", f"--control={study}"],  # a control without an fp run
        [f"--study=a={study}", "--gaps=1"],  # gaps need a control
    ]
    for extra in bad:
        with pytest.raises(SystemExit):
            compare.parse_args([f"--out={out}", *extra])


def test_teacher_can_start_from_another_run():
    from lbq.configs import default

    run = reproduce.StudyRun("best", 2, 0)
    config = reproduce.run_config(default.get_config(), run, 8, 0.01, "/s", 0.2, "/t")
    assert (config.init_from, config.distill.teacher_init) == ("/s", "/t")
    assert [(s.lr, s.teacher_lr) for s in config.stages] == [(0.01, 0.002)] * 2
    plain = reproduce.run_config(default.get_config(), run, 8, 0.01, "/s", 0.2)
    assert plain.distill.teacher_init == "/s"


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--bits=x", "argument --bits: 'x' is not a comma-separated list of whole numbers"),
        ("--bits=4,,2", "argument --bits: '4,,2' is not a comma-separated list of whole numbers"),
        ("--bits=33", "argument --bits: 33 is not in 1..32"),
        ("--seeds=0,-1", "argument --seeds: -1 is not in 0..2147483647"),
    ],
)
def test_a_bad_bit_width_or_seed_list_is_one_usage_error(flag, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.parse_args(["--preset=tiny", f"--outdir={tmp_path}", flag])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {expected}")


def test_bit_widths_and_seeds_parse_in_their_order(tmp_path):
    args = reproduce.parse_args(["--outdir", str(tmp_path), "--bits=4,2", "--seeds=1,0"])
    assert (args.bits, args.seeds) == ([4, 2], [1, 0])
    assert reproduce.parse_args(["--outdir", str(tmp_path)]).bits == [2, 4]  # the default
