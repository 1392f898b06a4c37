"""The paper's method comparison: every method at W4A4 and W2A2, several seeds, one budget.

Runs, for each seed, full precision once and then each method at each bit-width, every run in
its own workdir ``OUTDIR/<method>_w<k>a<k>_s<seed>`` (``fp_w32a32_s<seed>`` for full precision),
through `lbq.train.train_and_evaluate`. Every run trains the same number of steps (``--epochs``);
multi-stage methods split them between their stages as `lbq.configs.recipes.ladder` does, or
give ``--last_stage_share`` to the last one (the target bit-width). `METHOD_NOTES` says what
each method trains; docs/results/README.md gives the CIFAR-10 study's command line.

The flags of `FIELD_FLAGS` set their config field in every run (unset: the default config's;
quantizers and placement default to the paper's, DoReFa at block outputs; the best at W2A2:
docs/results/w2a2). Any other field: ``--set=FIELD=VALUE`` (repeatable; VALUE a Python literal,
else a string), set after the method's own settings, e.g. ``--set=distill.student_ce=0.0``.

Finished runs (a ``result.json`` in their workdir) are skipped; an interrupted run resumes from
its checkpoint. After the runs, ``OUTDIR/results.md`` (table) and ``OUTDIR/accuracy_vs_bits.png``
(`lbq.experiments.compare`'s bars: a bar per method and bit-width, the fp runs as the line)
are written from every ``result.json`` found (``--report``: only that).

Fine-tuning from a trained full-precision model (the paper's ImageNet protocol): train fp
first, then start every run from it, teachers included (``--start_from=OUTDIR_FP/fp_w32a32_s0``);
pq and best then skip their 32-bit stage, every stage trains at ``--fine_tune_lr`` and teachers
at 0.2x that (``--teacher_lr_scale``; the ImageNet recipe's 0.001 / 0.005). For a start model
trained at 32 bits with clip(0, 1) activations, ``--teacher_start_from`` names a plain-ReLU run
for kd's and best's teachers.

List the runs without training: add ``--dry_run``. Tiny mode for tests (digits, 4 steps per
run, enough for the four stages of pq at W2A2): ``--preset=tiny``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from lbq.configs import default, recipes
from lbq.configs.recipes import METHODS
from lbq.experiments import compare
from lbq.experiments.compare import load_results, summarize
from lbq.io import write_json
from lbq.metrics import clock
from lbq.validate import ConfigError, get_field, whole_numbers

METHOD_NOTES = {
    "fp": "full precision, plain ReLU",
    "direct": "wKaK from the first step (baseline)",
    "ts": "wKa32 50 % (lr 0.1) -> wKaK 50 % (lr 0.01)",
    "pq": "W2A2: 32/8/4/2 bits 40/20/20/20 %; W4A4: 32/8/4 bits 40/30/30 %; lr 0.1 then 0.01",
    "sp": "blocks quantized with p linear 0.5 -> 1 at 50 % of the run, then all quantized",
    "kd": "joint FP teacher from scratch; student 0.7 CE + 0.7 KL, teacher 1.0 CE + 0.5 KL, T=1",
    "best": "W2A2: 32/4/2 bits 40/30/30 %; W4A4: 32/4 bits 40/60 %; lr 0.1 then 0.01; + kd",
}
# The same methods started from a trained full-precision model (--start_from).
PRETRAINED_NOTES = {
    **METHOD_NOTES,
    "fp": "full precision, plain ReLU, trained on at the fine-tuning lr",
    "ts": "wKa32 50 % -> wKaK 50 %",
    "pq": "W2A2: 8/4/2 bits, a third each; W4A4: 8/4 bits 50/50 %",
    "kd": "joint teacher started trained; student 0.7 CE + 0.7 KL, teacher 1.0 CE + 0.5 KL, T=1",
    "best": "W2A2: 4/2 bits 50/50 %; W4A4: 4 bits (the same run as kd); + kd",
}
FINE_TUNE_LR = 0.01
# The flags that set one config field of every run, in the order they are set.
FIELD_FLAGS = {
    "lr_schedule": "schedule.lr_schedule",
    "weight_quantizer": "quant.weight_quantizer",
    "activation_quantizer": "quant.activation_quantizer",
    "weight_range_at_bit_change": "quant.weight_range_at_bit_change",
    "activation_placement": "model.activation_placement",
    "activation_calibration": "quant.activation_calibration",
    "activation_range_at_bit_change": "quant.activation_range_at_bit_change",
}


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One (method, bits, seed) run."""

    method: str
    bits: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_w{self.bits}a{self.bits}_s{self.seed}"


def base_config(preset: str, args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The settings every run shares, before the method is applied."""
    c = default.get_config()
    c.model.name = "resnet20"
    c.batch_size = 128
    c.schedule.lr = 0.1
    c.schedule.teacher_lr = 0.1
    for flag, field in FIELD_FLAGS.items():
        if getattr(args, flag) is not None:  # else the default config's
            set_field(c, field, getattr(args, flag))
    c.progress = False
    if preset == "tiny":
        c = default.tiny(c)
        c.data.train_split = "train"
        c.eval_batch_size = 128
        return c
    c.data.name = args.dataset
    c.data.data_dir = args.data_dir
    c.data.train_split = (
        f"train[:{args.train_images}]" if args.train_images else "train"
    )  # a fixed slice: the same images for every run
    c.data.eval_split = args.eval_split
    c.data.augment = "cifar"
    c.data.cache = None  # decode the (small) train split once
    c.data.workers = args.workers
    c.eval_batch_size = 500
    c.eval_every_epochs = 0.0  # evaluate at the end of each stage only: eval time is not free
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    return c


def stage_plan(
    method: str,
    bits: int,
    fine_tune_lr: float = FINE_TUNE_LR,
    pretrained: bool = False,
    last_stage_share: float | None = None,
) -> list[tuple[int, int, float, float | None]]:
    """The stages of a method: (w_bits, a_bits, fraction of the budget, lr or None).

    The method's ladder as the CIFAR configs define it (`lbq.configs.recipes.ladder`). None is
    the run's lr (0.1); ``fine_tune_lr`` is that of stages that start from a previous stage's
    weights. ``pretrained``: the run starts from a trained full-precision model (the paper's
    ImageNet protocol), which stands in for the 32-bit stage of pq and best; the remaining
    stages share the budget in the same proportions, all at ``fine_tune_lr``.
    ``last_stage_share``: the fraction of the budget of a multi-stage plan's last stage (the
    target bit-width); the earlier stages share the rest in their proportions.
    """
    plan = [
        (w, a, share, fine_tune_lr if lr == recipes.FINE_TUNE else None)
        for w, a, share, lr in recipes.ladder(method, bits)
    ]
    if pretrained:
        kept = [(w, a, f) for w, a, f, _ in plan if (w, a) != (32, 32) or method == "fp"]
        total = sum(f for _, _, f in kept)
        plan = [(w, a, f / total, fine_tune_lr) for w, a, f in kept]
    if last_stage_share is None or len(plan) == 1:
        return plan
    earlier = sum(f for _, _, f, _ in plan[:-1])
    scale = (1.0 - last_stage_share) / earlier
    return [(w, a, f * scale, lr) for w, a, f, lr in plan[:-1]] + [
        (*plan[-1][:2], last_stage_share, plan[-1][3])
    ]


def split_steps(total: int, fractions: Sequence[float]) -> list[int]:
    """Whole-step stage lengths that sum exactly to ``total`` (equal budget for every method).

    Stage ends are the rounded cumulative fractions; when that leaves a stage empty (a few
    steps only, as in the tiny mode), every stage gets one step and the rest is split so.
    """
    n = len(fractions)
    if total < n:
        raise ValueError(f"{total} steps are too few to split into {n} stages")

    def lengths(steps: int) -> list[int]:
        ends = [round(steps * sum(fractions[: i + 1])) for i in range(n)]
        ends[-1] = steps
        return [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    plain = lengths(total)
    if min(plain) > 0:
        return plain
    return [1 + extra for extra in lengths(total - n)]


def run_config(
    base: ml_collections.ConfigDict,
    run: StudyRun,
    total_steps: int,
    fine_tune_lr: float = FINE_TUNE_LR,
    start_from: str = "",
    teacher_lr_scale: float = 1.0,
    teacher_start_from: str = "",
    last_stage_share: float | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """The full config of one run.

    ``start_from``: a trained full-precision run that every network starts from (the student
    through ``init_from``, the teacher through ``distill.teacher_init``, unless
    ``teacher_start_from`` names another run for the teacher). ``teacher_lr_scale``:
    the teacher's lr relative to the student's in every stage. ``last_stage_share``: see
    `stage_plan`. ``overrides``: {dotted field: value} set last, over the method's own
    settings (``--set``).
    """
    c = ml_collections.ConfigDict(base.to_dict())
    c.seed = run.seed
    # The method's switches as its config file sets them; the stages below replace the
    # config's epochs with this study's equal step budget.
    recipes.apply_method(c, run.method, run.bits, epochs=1.0, fine_tune_lr=fine_tune_lr)
    if run.method == "fp":
        c.quant.w_bits = c.quant.a_bits = 32
    plan = stage_plan(
        run.method, run.bits, fine_tune_lr, bool(start_from), last_stage_share=last_stage_share
    )
    lengths = split_steps(total_steps, [f for _, _, f, _ in plan])
    stages = []
    for (w, a, _, lr), steps in zip(plan, lengths, strict=True):
        lr = c.schedule.lr if lr is None else lr
        rates = {"lr": lr, "teacher_lr": lr * teacher_lr_scale}
        stages.append(default.stage(f"w{w}a{a}", w_bits=w, a_bits=a, steps=steps, **rates))
    c.stages = stages
    if c.distill.enabled:
        c.distill.teacher_init = teacher_start_from or start_from or None
    c.init_from = start_from or None
    for field, value in (overrides or {}).items():
        set_field(c, field, value)
    return c


def set_field(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
    """Sets dotted ``field`` of ``config`` to ``value``.

    Raises:
      ValueError: for a field the config lacks, or a value of another type than the field's.
    """
    section, _, name = field.rpartition(".")
    try:
        node = get_field(config, section) if section else config
    except ConfigError:
        node = None
    is_dict = isinstance(node, ml_collections.ConfigDict)
    if not is_dict or name not in node or isinstance(node[name], ml_collections.ConfigDict):
        raise ValueError(f"{field} is not a config field")
    try:
        node[name] = value
    except TypeError:
        raise ValueError(
            f"{field}={value!r}: a {type(value).__name__}, but the field holds a "
            f"{type(node[name]).__name__}"
        ) from None


def plan_runs(
    methods: Sequence[str], bits: Sequence[int], seeds: Sequence[int], order: str = "seed"
) -> list[StudyRun]:
    """The runs in the order to train them, methods in the order given.

    'seed': seed-major (fp, then every method at each bit-width, seed after seed), so a partial
    study (deadline, preemption) holds the whole grid for the first seeds. 'bits':
    bit-width-major (every seed of the first bit-width first), with fp for every seed first.
    """
    if order not in ("seed", "bits"):
        raise ValueError(f"order={order!r} is not 'seed' or 'bits'")
    quantized = [m for m in methods if m != "fp"]
    fp = [("fp", 32)] if "fp" in methods else []
    if order == "seed":
        grid = fp + [(m, k) for k in bits for m in quantized]
        return [StudyRun(m, k, seed) for seed in seeds for m, k in grid]
    fp_runs = [StudyRun(m, k, seed) for m, k in fp for seed in seeds]
    return fp_runs + [StudyRun(m, k, seed) for k in bits for seed in seeds for m in quantized]


def execute(
    run: StudyRun, config: ml_collections.ConfigDict, workdir: str, steps_per_epoch: int
) -> dict[str, Any]:
    """Trains one run (resuming if interrupted) and writes its ``result.json``."""
    from lbq.train import train_and_evaluate

    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    result = train_and_evaluate(config, workdir)
    if result.status != "completed":
        raise SystemExit(f"{run.name}: run ended with status {result.status!r}; rerun to resume")
    record = {
        **dataclasses.asdict(run),  # method, bits, seed
        "top1": result.final["student"]["top1"],
        "top5": result.final["student"].get("top5"),
        "final": result.final,
        "steps": result.step,
        "epochs": result.step / steps_per_epoch,
        "stages": result.stages,
        "images_per_second": result.images_per_second,
        "seconds": time.time() - start,
    }
    write_json(os.path.join(workdir, "result.json"), record)  # atomic: whole or absent
    return record


def format_table(
    records: Sequence[dict[str, Any]],
    header: str = "",
    bits: Sequence[int] = (),
    notes: dict[str, str] = METHOD_NOTES,
) -> str:
    """The Markdown table: top-1 mean ± std (sample std over seeds, n seeds) per method and
    bit-width, then every run.

    Args:
      records: the runs' result.json contents.
      header: a paragraph above the table.
      bits: the bit-width columns (default: those found in ``records``).
      notes: a line per method, saying what it trains.
    """
    summary = summarize(records)
    bits = sorted(set(bits) or {b for _, b in summary if b != 32}, reverse=True)
    lines = [header] if header else []
    lines += [
        "| method | " + " | ".join(f"W{b}A{b} top-1 (%)" for b in bits) + " | FP top-1 (%) |"
        " epochs per run | mean time per run (s) |",
        "|---" * (len(bits) + 4) + "|",
    ]
    for method in METHODS:
        keys = [(method, b) for b in bits] + [(method, 32)]
        found = [summary[key] for key in keys if key in summary]
        if not found:
            continue
        expected = keys[-1:] if method == "fp" else keys[:-1]  # "—" where these have no run
        cells = [
            compare.format_mean(summary[key], 1) if key in summary else "—" * (key in expected)
            for key in keys
        ]
        epochs = "/".join(f"{e:g}" for e in sorted({e for s in found for e in s["epochs"]}))
        seconds = sum(s["seconds"] for s in found) / len(found)
        lines.append(f"| {method} | {' | '.join(cells)} | {epochs} | {seconds:.0f} |")
    lines += ["", "Methods (every run has the same total number of training steps):", ""]
    lines += [f"- `{m}`: {notes[m]}" for m in METHODS]
    lines += [
        "",
        "Per run (wall time includes compilation and the evaluation after each stage):",
        "",
        "| run | stages (steps) | top-1 (%) | teacher top-1 (%) | train images/s | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["seed"], -r["bits"], METHODS.index(r["method"]))):
        stages = " -> ".join(f"w{s['w_bits']}a{s['a_bits']}:{s['steps']}" for s in r["stages"])
        teacher = r["final"].get("teacher", {}).get("top1")
        lines.append(
            f"| {r['method']}_w{r['bits']}a{r['bits']}_s{r['seed']} | {stages} | "
            f"{100 * r['top1']:.2f} | {'' if teacher is None else f'{100 * teacher:.2f}'} | "
            f"{r['images_per_second']:.0f} | {r['seconds']:.0f} |"
        )
    total = sum(r["seconds"] for r in records)
    lines += ["", f"{len(records)} runs, {total:.0f} s of wall time in all."]
    return "\n".join(lines) + "\n"


def write_outputs(outdir: str, title: str, table: Callable[[list], str]) -> list[dict[str, Any]]:
    """Writes results.md (``table(records)``) and accuracy_vs_bits.png from every finished run
    under ``outdir``; returns their records."""
    records = load_results(outdir)
    if not records:
        return records
    pathlib.Path(outdir, "results.md").write_text(table(records))
    fp = [r for r in records if r["method"] == "fp"]
    quantized = [r for r in records if r["method"] != "fp"]
    result = compare.compare([("this study", quantized)], fp)
    compare.plot(result, os.path.join(outdir, "accuracy_vs_bits.png"), title=title)
    return records


def check_outputs_writable(outdir: str) -> None:
    """Refuses, before any run trains, an ``outdir`` where the table or the plot (first written
    after the first run) cannot be written: SystemExit with one ``lbq: error:`` line."""
    for path in (os.path.join(outdir, n) for n in ("results.md", "accuracy_vs_bits.png")):
        if os.path.isdir(path):
            raise SystemExit(f"lbq: error: cannot write {path}: it is a folder")
    try:
        with tempfile.TemporaryFile(dir=outdir):
            pass
    except OSError as error:
        raise SystemExit(f"lbq: error: cannot write into {outdir}: {error.strerror}") from None


def _parsed_overrides(p: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, Any]:
    """{field: value} of the ``--set`` flags, each checked against the default config."""
    overrides, defaults = {}, default.get_config()
    for item in items:
        field, sep, text = item.partition("=")
        if not sep or not field:
            p.error(f"--set={item}: expected FIELD=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        try:
            set_field(defaults, field, value)
        except ValueError as error:
            p.error(f"--set: {error}")
        overrides[field] = value
    return overrides


def _checked(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the start-model defaults filled in and its run folders made absolute;
    exits through ``p.error`` for a flag that cannot be used."""
    if args.teacher_lr_scale is None:
        args.teacher_lr_scale = 0.2 if args.start_from else 1.0
    if args.teacher_start_from and not args.start_from:
        p.error("--teacher_start_from needs --start_from")
    for kind, learned in (("weight", ("lsq",)), ("activation", ("pact", "lsq"))):
        rule = getattr(args, f"{kind}_range_at_bit_change")
        if rule is not None and getattr(args, f"{kind}_quantizer") not in learned:
            needs = f"--{kind}_quantizer={' or '.join(learned)}"
            p.error(f"--{kind}_range_at_bit_change={rule} needs {needs}")
    if args.last_stage_share is not None and not 0 < args.last_stage_share < 1:
        p.error(f"--last_stage_share={args.last_stage_share} must be in (0, 1)")
    args.set = _parsed_overrides(p, args.set)
    for flag in ("start_from", "teacher_start_from"):
        path = getattr(args, flag)
        if path and not os.path.isdir(path):
            p.error(f"--{flag}={path}: no such run folder")
        setattr(args, flag, path and os.path.abspath(path))
    return args


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line (see the module docstring, which ``--help`` prints); exits through
    ``ArgumentParser.error`` for a flag that cannot be used."""
    p = argparse.ArgumentParser(
        prog="python -m lbq.experiments.reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--preset", choices=("cifar10", "tiny"), default="cifar10", help="tiny: digits, for tests")
    add("--outdir", required=True, help="one workdir per run, the table and the plot")
    add("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    add("--bits", type=whole_numbers(1, 32), default="2,4", help="in the order to run them")
    add("--order", default="seed", choices=("seed", "bits"), help="see plan_runs")
    add("--seeds", type=whole_numbers(0, 2**31 - 1), default="0,1", help="every run once per seed")
    add("--epochs", type=float, default=4.0, help="total epochs of every run")
    add("--dataset", default="cifar10_jpeg", help="TFDS name (from lbq.data.prepare or tfds)")
    add("--data_dir", default="/tmp/lbq_tfds", help="the TFDS data directory")
    add("--train_images", type=int, default=5000, help="0: the whole train split")
    add("--eval_split", default="test", help="TFDS split evaluated after each stage")
    add("--workers", type=int, default=2, help="host decode threads (data.workers)")
    # Each sets the config field FIELD_FLAGS names in every run; None: the default config's.
    add("--lr_schedule", default="cosine", choices=("cosine", "step", "constant"))
    add("--weight_quantizer", default="dorefa", choices=("dorefa", "lsq"))
    add("--activation_quantizer", default="dorefa", choices=("dorefa", "pact", "lsq"))
    add("--weight_range_at_bit_change", choices=("keep", "lsq_rule"), help="LSQ weights only")
    add("--activation_placement", choices=("block_output", "conv_input"), help="SPEC section 9")
    add("--activation_calibration", choices=("percentile", "lsq"), help="of a start model's ranges")
    add("--activation_range_at_bit_change", choices=("keep", "calibrate"), help="PACT, LSQ")
    add("--last_stage_share", type=float, help="(0, 1); default: the ladder's (stage_plan)")
    add("--fine_tune_lr", type=float, default=FINE_TUNE_LR, help="lr of fine-tuning stages")
    add("--start_from", default="", help="a trained fp run (workdir) every run starts from")
    add("--teacher_start_from", default="", help="the teachers' start (default: --start_from)")
    add("--teacher_lr_scale", type=float, help="default: 1 from scratch, 0.2 with --start_from")
    add("--compile_cache", default="", help="JAX persistent compilation cache folder")
    add("--set", action="append", default=[], metavar="FIELD=VALUE", help="any field; repeatable")
    add("--dry_run", action="store_true", help="list the runs and exit")
    add("--report", action="store_true", help="only rewrite the table and plot")
    return _checked(p, p.parse_args(argv))


def _range_rule_note(q: ml_collections.ConfigDict) -> str:
    """`` (rules)``: the range rules at a bit-width change of the learned ranges that the
    study's quantizers ``q`` (its ``quant`` section) have, or "" when they have none."""
    rules = []
    if q.weight_quantizer == "lsq":
        rules.append(f"LSQ weight ranges at a bit-width change: {q.weight_range_at_bit_change}")
    if q.activation_quantizer in ("pact", "lsq"):
        rules.append(f"activation ranges at a bit-width change: {q.activation_range_at_bit_change}")
    return f" ({'; '.join(rules)})" if rules else ""


def _describe_study(
    args, base, info, total_steps: int, steps_per_epoch: int
) -> tuple[str, str, dict[str, str]]:
    """The results table's header, the plot's title and the method notes of this study."""
    q, epochs = base.quant, total_steps / steps_per_epoch
    header = (
        f"Top-1 on {info.name}[{base.data.eval_split}] ({info.num_eval} images), ResNet-20, "
        f"trained on {base.data.train_split} ({info.num_train} images). Equal training budget: "
        f"every run trains {total_steps} steps of batch {base.batch_size} ({epochs:.2f} epochs), "
        f"split between its stages. Mean ± sample std over n seeds. Quantizers: weights "
        f"{q.weight_quantizer}, activations {q.activation_quantizer} at "
        f"{base.model.activation_placement} (calibration: {q.activation_calibration})"
        f"{_range_rule_note(q)}.\n"
    )
    if args.start_from:
        header += (
            f"\nEvery run, fp and teachers included, starts from the full-precision run "
            f"{args.start_from}, which stands in for the 32-bit stage of pq and best; every "
            f"stage trains at lr {args.fine_tune_lr:g}, teachers at {args.teacher_lr_scale:g}x "
            f"that.\n"
        )
        if args.teacher_start_from:
            header += f"Teachers start from {args.teacher_start_from} instead.\n"
    if args.set:
        header += f"Every run also sets {', '.join(f'{k}={v!r}' for k, v in args.set.items())}.\n"
    model = "ResNet-20 from a trained FP model" if args.start_from else "ResNet-20"
    title = f"{model}, {info.name} ({info.num_train} train images, {epochs:.2f} epochs)"
    return header, title, PRETRAINED_NOTES if args.start_from else METHOD_NOTES


def _list_runs(runs, pending, config_of) -> None:
    """Prints every run with its stages and whether it has finished (--dry_run)."""
    for i, run in enumerate(runs, 1):
        c = config_of(run)
        stages = " -> ".join(f"{s.name}:{s.steps}" for s in c.stages)
        done = "done" if run not in pending else "todo"
        extra = " +kd" if c.distill.enabled else ""
        extra += " +sp" if c.stochastic.enabled else ""
        print(f"  {i:>3}/{len(runs)} [{done}] {run.name}: {stages}{extra}")


def _train_pending(runs, pending, config_of, steps_per_epoch, outdir, write) -> list[str]:
    """Trains the runs not yet finished, in order, each with ``config_of(run)``; returns the
    names of those that failed (a failed run does not end the study). ``write()`` rewrites the
    table and plot after each."""
    t0, durations, failed = time.time(), [], []
    for i, run in enumerate(runs, 1):
        if run not in pending:
            continue
        config = config_of(run)
        left = len(pending) - len(durations)  # distillation runs cost about 2x: the ETA is rough
        eta = clock(sum(durations) / len(durations) * left) if durations else "unknown"
        print(
            f"[{i}/{len(runs)}] {run.name} (todo {len(durations) + 1}/{len(pending)}); "
            f"elapsed {clock(time.time() - t0)}, ETA {eta}",
            flush=True,
        )
        try:
            record = execute(run, config, os.path.join(outdir, run.name), steps_per_epoch)
        except Exception as error:  # noqa: BLE001 - one failed run must not end the study
            failed.append(run.name)
            print(f"[{i}/{len(runs)}] {run.name} FAILED: {error!r}; rerun to retry", flush=True)
            continue
        durations.append(record["seconds"])
        print(
            f"[{i}/{len(runs)}] {run.name}: top-1 {100 * record['top1']:.2f} % in "
            f"{record['seconds']:.0f} s",
            flush=True,
        )
        write()  # partial results are publishable
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("matplotlib") is None:  # checked before hours of training
        raise SystemExit("lbq: error: reproduce draws its plot with matplotlib; pip install lbq")
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    runs = plan_runs(methods, args.bits, args.seeds, args.order)
    base = base_config(args.preset, args)

    from lbq import data as lbq_data
    from lbq.plan import parse_config

    info = lbq_data.get_info(base.data)
    steps_per_epoch = parse_config(base).steps_per_epoch(info.num_train)
    total_steps = 4 if args.preset == "tiny" else round(args.epochs * steps_per_epoch)
    header, title, notes = _describe_study(args, base, info, total_steps, steps_per_epoch)
    os.makedirs(args.outdir, exist_ok=True)
    check_outputs_writable(args.outdir)

    done = [r for r in runs if os.path.exists(os.path.join(args.outdir, r.name, "result.json"))]
    pending = [r for r in runs if r not in done]
    print(
        f"{len(runs)} runs ({len(done)} finished, {len(pending)} to do); equal budget: "
        f"{total_steps} steps = {total_steps / steps_per_epoch:.2f} epochs each",
        flush=True,
    )
    config_of = functools.partial(
        run_config,
        base,
        total_steps=total_steps,
        fine_tune_lr=args.fine_tune_lr,
        start_from=args.start_from,
        teacher_lr_scale=args.teacher_lr_scale,
        teacher_start_from=args.teacher_start_from,
        last_stage_share=args.last_stage_share,
        overrides=args.set,
    )
    if args.dry_run:
        _list_runs(runs, pending, config_of)
        return 0
    table = functools.partial(format_table, header=header, bits=args.bits, notes=notes)
    write = functools.partial(write_outputs, args.outdir, title, table)
    if args.report:
        records = write()
        print(table(records) if records else "no finished runs")
        return 0

    if args.compile_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    t0 = time.time()
    failed = _train_pending(runs, pending, config_of, steps_per_epoch, args.outdir, write)
    records = write()
    print(f"total {clock(time.time() - t0)}; {len(records)} results in {args.outdir}")
    if failed:
        print(f"failed (rerun to retry): {', '.join(failed)}")
    if records:
        print(table(records))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
