"""Export a trained run as a low-bit model: ``python -m lbq.export --workdir=W --out=DIR``.

For the student (and every extra student), at the checkpoint stage's bit-widths, it writes
``DIR/<network>/packed.npz`` (`lbq.deploy.package`, run by `lbq.deploy.integer`),
``DIR/<network>/model.qonnx.onnx`` (`lbq.deploy.qonnx_export`) and ``DIR/manifest.json``, then
checks them against lbq's fake-quantized forward on ``--check_images`` eval images. The folder,
the check, its tolerance and the folder lock are described in docs/deploy.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

import numpy as np

from lbq.deploy import package
from lbq.deploy.cli import run_command
from lbq.deploy.errors import DeployError
from lbq.deploy.verify import CHECK_MAX_REL_DIFF, CHECK_MIN_AGREEMENT
from lbq.io import write_json
from lbq.workdir import LOCK_FILE, WorkdirError, WorkdirLock


class CheckFailed(DeployError):
    """The export's own check exceeded its tolerance; ``manifest`` is what was written."""

    def __init__(self, message: str, manifest: dict[str, Any]):
        super().__init__(message)
        self.manifest = manifest


def prepare_export_folder(out: str, overwrite: bool) -> None:
    """Makes the existing folder ``out`` ready: empty (but for its ``lbq.lock``), or with
    ``overwrite`` cleared of the files an earlier lbq export listed in its manifest (other
    files stay).

    Raises:
      DeployError: when ``out`` is not empty and ``overwrite`` is not given.
    """
    if not set(os.listdir(out)) - {LOCK_FILE}:
        return
    manifest_path = os.path.join(out, package.MANIFEST)
    earlier = os.path.isfile(manifest_path)
    if not overwrite:
        what = "an earlier lbq export" if earlier else "files lbq did not write"
        raise DeployError(f"--out={out} is not empty (it holds {what}); pass --overwrite")
    if not earlier:
        return
    try:
        manifest = package.read_manifest(out)
    except DeployError:
        manifest = {}
    os.remove(manifest_path)  # first: a half-replaced folder has none
    root = os.path.realpath(out)
    for entry in manifest.get("networks", {}).values():
        for relative in entry.get("files", {}).values():
            path = os.path.realpath(os.path.join(out, relative))
            if os.path.commonpath([root, path]) != root:
                continue  # a manifest names only files inside its folder; leave anything else
            if os.path.isfile(path):
                os.remove(path)
            folder = os.path.dirname(path)
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


def _write_network(run, name: str, program, out: str) -> dict[str, Any]:
    """Writes one network's packed file and QONNX graph; returns its manifest entry."""
    import onnx

    from lbq.deploy.qonnx_export import to_qonnx

    stored, ops = package.packed_arrays(program)
    os.makedirs(os.path.join(out, name), exist_ok=True)
    files = {"packed": f"{name}/{package.PACKED}", "qonnx": f"{name}/{package.QONNX}"}
    package.write_packed(os.path.join(out, files["packed"]), stored)
    graph = to_qonnx(
        program,
        mean=run.info.mean,
        std=run.info.std,
        image_size=run.preprocessing()["image_size"],
        num_classes=run.info.num_classes,
    )
    onnx.save(graph, os.path.join(out, files["qonnx"]))
    return {
        "model": run.model_description(),
        "quantizers": dict(zip(("weight", "activation"), run.quantizers(), strict=True)),
        "layers": program.layers,
        "ops": ops,
        "arrays": package.array_index(stored),
        "files": files,
        "sha256": {rel: package.sha256(os.path.join(out, rel)) for rel in files.values()},
        "size": package.size_report(ops, stored),
        "packed_file_bytes": os.path.getsize(os.path.join(out, files["packed"])),
    }


def check_export(
    run, out: str, count: int, min_agreement: float, max_rel_diff: float
) -> dict[str, Any]:
    """Compares each written network with lbq's fake-quantized forward on ``count`` images.

    The reference is lbq's forward in float32, the arithmetic the export's float parts use.
    When the run's own forward (the one `lbq.evaluate` runs) computes in another dtype, it is
    run too and compared with that reference (``run_forward``).

    Returns:
      {network: {'data', 'reference', 'integer_vs_lbq', 'qonnx_vs_lbq' (`logit_agreement`'s
      figures), 'tolerance', 'failures' (`check_verdict` lines; empty when the check passed),
      'top1_accuracy', and 'run_forward' for a run in another dtype}}.
    """
    import jax.numpy as jnp

    from lbq.deploy.integer import IntegerForward
    from lbq.deploy.qonnx_export import run_qonnx
    from lbq.deploy.verify import check_verdict, fake_quant_logits, logit_agreement

    images, labels = run.eval_images(count)
    mean, std = run.info.mean, run.info.std
    checks = {}
    for net in run.students:
        loaded = package.load_model(out, net.name, check_qonnx=True)
        w_bits = [layer["w_bits"] for layer in loaded.program.layers]
        a_bits = [layer["a_bits"] for layer in loaded.program.layers]
        lbq_forward = functools.partial(fake_quant_logits, net.model, run.variables[net.name])
        reference = lbq_forward(w_bits, a_bits, images, mean, std)
        integer = IntegerForward(loaded.program, mean, std)(images)
        qonnx = run_qonnx(loaded.file("qonnx"), images)
        check = {
            "data": f"first {len(images)} images of {run.plan.data.name}"
            f"[{run.plan.data.eval_split}]",
            "reference": "lbq's fake-quantized forward in float32",
            "integer_vs_lbq": logit_agreement(reference, integer),
            "qonnx_vs_lbq": logit_agreement(reference, qonnx),
            "tolerance": {"min_top1_agreement": min_agreement, "max_rel_diff": max_rel_diff},
            "top1_accuracy": {"lbq_float32": _accuracy(reference, labels)},
        }
        check["failures"] = [
            f"{label.split('_')[0]} forward vs lbq's float32 forward: {verdict}"
            for label in ("integer_vs_lbq", "qonnx_vs_lbq")
            if (verdict := check_verdict(check[label], min_agreement, max_rel_diff))
        ]
        own_dtype = jnp.dtype(getattr(net.model, "dtype", None) or jnp.float32)
        if own_dtype != jnp.float32:
            own = lbq_forward(w_bits, a_bits, images, mean, std, dtype=own_dtype)
            check["run_forward"] = {"dtype": own_dtype.name, **logit_agreement(reference, own)}
            check["top1_accuracy"][f"lbq_{own_dtype.name}"] = _accuracy(own, labels)
        checks[net.name] = check
    return checks


def _accuracy(logits, labels) -> float:
    return float(np.mean(np.argmax(logits, -1) == labels)) if len(labels) else 0.0


def _human(n: float) -> str:
    return f"{n:,.0f} B"


def summary(manifest: dict[str, Any]) -> str:
    lines = []
    for name, entry in manifest["networks"].items():
        ws, as_ = (sorted({layer[k] for layer in entry["layers"]}) for k in ("w_bits", "a_bits"))
        lines.append(f"{name}: {entry['model']['name']}, weight bits {ws}, activation bits {as_}")
        for kind in ("quantized_convs", "quantized_dense"):
            if kind in entry["size"]:
                s = entry["size"][kind]
                lines.append(
                    f"  {kind.replace('_', ' ')}: {s['layers']} layers, {s['weights']:,} weights: "
                    f"{_human(s['float32_bytes'])} as float32 -> {_human(s['packed_bytes'])} "
                    f"packed (1/{1 / s['fraction_of_float32']:.2f})"
                )
        size = entry["size"]
        lines.append(
            f"  all arrays: {_human(size['all_float32_bytes'])} as float32 -> "
            f"{_human(size['all_stored_bytes'])} stored (1/{1 / size['fraction_of_float32']:.2f});"
            f" {entry['files']['packed']}: {_human(entry['packed_file_bytes'])}"
        )
        check = manifest.get("checks", {}).get(name)
        if check:
            for label in ("integer_vs_lbq", "qonnx_vs_lbq"):
                c = check[label]
                lines.append(
                    f"  {label.replace('_', ' ')} on {c['images']} images: top-1 agreement "
                    f"{100 * c['top1_agreement']:.2f} %, max |logit diff| {c['max_abs_diff']:.2e}"
                )
            lines.append(f"  reference: {check['reference']}")
            own = check.get("run_forward")
            if own:
                acc = check["top1_accuracy"]
                lines.append(
                    f"  the run evaluates in {own['dtype']} (lbq.evaluate): on these images "
                    f"top-1 {100 * acc['lbq_' + own['dtype']]:.2f} % against "
                    f"{100 * acc['lbq_float32']:.2f} % in float32; top-1 agreement with float32 "
                    f"{100 * own['top1_agreement']:.2f} %, max |logit diff| "
                    f"{own['max_abs_diff']:.2e}"
                )
            lines += [f"  CHECK FAILED: {failure}" for failure in check["failures"]]
    return "\n".join(lines)


def export(
    run,
    out: str,
    overwrite: bool = False,
    check_images: int = 0,
    min_agreement: float = CHECK_MIN_AGREEMENT,
    max_rel_diff: float = CHECK_MAX_REL_DIFF,
) -> dict[str, Any]:
    """Writes the export folder of a loaded run, holding its ``lbq.lock`` from before the folder
    is inspected until the manifest is final; returns the manifest.

    Raises:
      DeployError: for a folder that may not be written or that another process is writing,
        or a network that cannot be exported (see `lbq.deploy.program.build_program`), before
        anything is written.
      CheckFailed: when the check on ``check_images`` images exceeds the tolerance (after the
        files and the manifest, which records the failed check, are written).
    """
    from lbq.deploy import run as runs
    from lbq.deploy.program import build_program

    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DeployError(f"--out={out} is a file, not a folder")
    bits = run.bits()
    # Every program is built before anything is written: a network that cannot be exported
    # leaves the folder untouched.
    programs = {
        net.name: build_program(
            net.model,
            run.variables[net.name],
            *bits[net.name],
            image_size=run.preprocessing()["image_size"],
            quantizers=run.quantizers(),
        )
        for net in run.students
    }
    lock = WorkdirLock(out)  # creates ``out``
    try:
        lock.acquire()
    except WorkdirError as error:
        raise DeployError(f"--out={out}: {_busy(error)}") from None
    try:
        prepare_export_folder(out, overwrite)
        manifest = {
            "format": package.FORMAT,
            "version": package.VERSION,
            "written_by": "lbq.export",
            "source": {"workdir": run.workdir, "step": run.step, "stage": run.stage.name},
            "dataset": {
                "name": run.plan.data.name,
                "num_classes": run.info.num_classes,
                "class_names": runs.class_names(run),
                "mean": list(run.info.mean),
                "std": list(run.info.std),
                **run.preprocessing(),
            },
            "default_network": "student",
            "networks": {name: _write_network(run, name, p, out) for name, p in programs.items()},
        }
        manifest_path = os.path.join(out, package.MANIFEST)
        write_json(manifest_path, manifest, indent=1)
        if check_images > 0:
            manifest["checks"] = check_export(run, out, check_images, min_agreement, max_rel_diff)
            write_json(manifest_path, manifest, indent=1)
            failures = [
                f"{name}: {failure}"
                for name, check in manifest["checks"].items()
                for failure in check["failures"]
            ]
            if failures:
                raise CheckFailed(
                    f"export check failed ({'; '.join(failures)}); the files are in {out} and "
                    f"{package.MANIFEST} records the check",
                    manifest,
                )
        return manifest
    finally:
        lock.release()


def _busy(error: WorkdirError) -> str:
    """WorkdirLock's refusal in an export's words."""
    text = str(error)
    if "in use by another lbq run" in text:
        holder = text.split("(", 1)[1].split(")", 1)[0]
        return f"another process is writing this folder ({holder}); wait for it to end"
    return text


def export_command(args: argparse.Namespace) -> int:
    from lbq.deploy import run as runs

    if args.check_images < 0:
        raise DeployError(f"--check_images={args.check_images} must be >= 0")
    if not 0.0 <= args.check_min_agreement <= 1.0:
        raise DeployError(
            f"--check_min_agreement={args.check_min_agreement} must be a fraction in [0, 1]"
        )
    if not args.check_max_rel_diff >= 0.0:  # NaN too
        raise DeployError(f"--check_max_rel_diff={args.check_max_rel_diff} must be >= 0")
    run = runs.load_run(args.workdir, args.step, data_dir=args.data_dir)
    check = (args.check_images, args.check_min_agreement, args.check_max_rel_diff)
    try:
        manifest = export(run, args.out, args.overwrite, *check)
    except CheckFailed as failure:
        print(summary(failure.manifest))
        raise
    print(f"lbq: exported {run.workdir} (step {run.step}) to {os.path.abspath(args.out)}")
    print(summary(manifest))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lbq.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the run's folder")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--step", type=int, default=None, help="a saved step (default: newest)")
    p.add_argument("--data_dir", default=None, help="where the run's dataset is now")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    p.add_argument(
        "--check_images",
        type=int,
        default=64,
        help="eval images to compare the written model with lbq's forward on (0: none)",
    )
    p.add_argument(
        "--check_min_agreement",
        type=float,
        default=CHECK_MIN_AGREEMENT,
        help="fail when the integer forward or QONNX agrees with lbq's top-1 on fewer than "
        "this fraction of the check images",
    )
    p.add_argument(
        "--check_max_rel_diff",
        type=float,
        default=CHECK_MAX_REL_DIFF,
        help="fail when a logit differs from lbq's by more than this fraction of the image's "
        "largest |logit| (at least 1)",
    )
    args = p.parse_args(argv)
    return run_command(lambda: export_command(args))


if __name__ == "__main__":
    sys.exit(main())
