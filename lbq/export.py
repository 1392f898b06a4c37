"""Export a trained run as a low-bit model: ``python -m lbq.export --workdir=W --out=DIR``.

For the student (and every extra student) it writes, at the checkpoint stage's bit-widths:

- ``DIR/<network>/packed.npz``: integer weight codes packed k bits per value, the scales and the
  full-precision parts (`lbq.deploy.package`), which the integer reference forward
  (`lbq.deploy.integer`) runs on its own;
- ``DIR/<network>/model.qonnx.onnx``: the same network as QONNX (`lbq.deploy.qonnx_export`);
- ``DIR/manifest.json``: network, layer order, bit-widths, operations, dataset mean/std, class
  names, preprocessing, sizes and checksums.

With ``--check_images=N`` (default 64) it then reads the written files back and compares the
integer forward and the QONNX graph (run by qonnx's executor) with lbq's fake-quantized forward
on the first N eval images; the figures go into the manifest. An existing, non-empty ``DIR`` is
only written with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from lbq.deploy import package
from lbq.deploy.cli import run_command
from lbq.deploy.errors import DeployError, write_json

DEFAULT_CHECK_IMAGES = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lbq.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="the run's folder")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--step", type=int, default=None, help="a saved step (default: newest)")
    parser.add_argument("--data_dir", default=None, help="where the run's dataset is now")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    parser.add_argument(
        "--check_images",
        type=int,
        default=DEFAULT_CHECK_IMAGES,
        help="eval images to compare the written model with lbq's forward on (0: none)",
    )
    return parser.parse_args(argv)


def prepare_folder(out: str, overwrite: bool) -> None:
    """Makes ``out`` ready: new or empty, or (with ``overwrite``) cleared of an earlier export.

    Only files an earlier lbq export listed in its manifest are removed; other files stay.

    Raises:
      DeployError: when ``out`` is a file, or a non-empty folder without ``overwrite``.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise DeployError(f"--out={out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out):
        earlier = os.path.isfile(os.path.join(out, package.MANIFEST))
        if not overwrite:
            what = "an earlier lbq export" if earlier else "files lbq did not write"
            raise DeployError(f"--out={out} is not empty (it holds {what}); pass --overwrite")
        if earlier:
            _remove_export(out)
    os.makedirs(out, exist_ok=True)


def _remove_export(out: str) -> None:
    try:
        manifest = package.read_manifest(out)
    except DeployError:
        manifest = {}
    os.remove(os.path.join(out, package.MANIFEST))  # first: a half-replaced folder has none
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


def check_export(run, out: str, count: int) -> dict[str, Any]:
    """Compares each written network with lbq's fake-quantized forward on ``count`` images."""
    from lbq.deploy.integer import IntegerForward
    from lbq.deploy.qonnx_export import run_qonnx
    from lbq.deploy.verify import compare, fake_quant_logits

    images, _ = run.eval_images(count)
    checks = {}
    for net in run.students:
        loaded = package.load_model(out, net.name, check_qonnx=True)
        w_bits = [layer["w_bits"] for layer in loaded.program.layers]
        a_bits = [layer["a_bits"] for layer in loaded.program.layers]
        reference = fake_quant_logits(
            net.model, run.variables[net.name], w_bits, a_bits, images, run.info.mean, run.info.std
        )
        integer = IntegerForward(loaded.program, run.info.mean, run.info.std)(images)
        qonnx = run_qonnx(loaded.file("qonnx"), images)
        checks[net.name] = {
            "data": f"first {len(images)} images of {run.plan.data.name}"
            f"[{run.plan.data.eval_split}]",
            "integer_vs_lbq": compare(reference, integer),
            "qonnx_vs_lbq": compare(reference, qonnx),
        }
    return checks


def _human(n: float) -> str:
    return f"{n:,.0f} B"


def summary(manifest: dict[str, Any]) -> str:
    lines = []
    for name, entry in manifest["networks"].items():
        layers = entry["layers"]
        ws = sorted({layer["w_bits"] for layer in layers})
        as_ = sorted({layer["a_bits"] for layer in layers})
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
    return "\n".join(lines)


def export(run, out: str, overwrite: bool = False, check_images: int = 0) -> dict[str, Any]:
    """Writes the export folder of a loaded run; returns its manifest.

    Raises:
      DeployError: for a folder that may not be written, or a network that cannot be exported
        (see `lbq.deploy.program.build_program`), before anything is written.
    """
    from lbq.deploy import run as runs
    from lbq.deploy.program import build_program

    out = os.path.abspath(out)
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
    prepare_folder(out, overwrite)
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
        "networks": {
            name: _write_network(run, name, program, out) for name, program in programs.items()
        },
    }
    _write_manifest(out, manifest)
    if check_images > 0:
        manifest["checks"] = check_export(run, out, check_images)
        _write_manifest(out, manifest)
    return manifest


def _write_manifest(out: str, manifest: dict[str, Any]) -> None:
    write_json(os.path.join(out, package.MANIFEST), manifest, indent=1)


def export_command(args: argparse.Namespace) -> int:
    from lbq.deploy import run as runs

    if args.check_images < 0:
        raise DeployError(f"--check_images={args.check_images} must be >= 0")
    run = runs.load_run(args.workdir, args.step, data_dir=args.data_dir)
    manifest = export(run, args.out, args.overwrite, args.check_images)
    print(f"lbq: exported {run.workdir} (step {run.step}) to {os.path.abspath(args.out)}")
    print(summary(manifest))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: export_command(args))


if __name__ == "__main__":
    sys.exit(main())
