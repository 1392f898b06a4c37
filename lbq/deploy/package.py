"""The exported model folder: packed integer files, QONNX graphs and one JSON manifest.

Layout of an export folder DIR (`lbq.export` writes it, `lbq.predict` reads it)::

    DIR/manifest.json                 format, dataset (classes, mean/std, preprocessing),
                                      and per network: model, layer order and bit-widths,
                                      operations, arrays, sizes, sha256 of each file
    DIR/<network>/packed.npz          integer codes packed k bits per value, scales, float parts
    DIR/<network>/model.qonnx.onnx    the same network as a QONNX graph

``packed.npz`` is an uncompressed NumPy archive (read with ``allow_pickle=False``): array
``quantized/codes`` holds the uint8 bytes of `lbq.deploy.pack` of every quantized layer (each op
records its offset and length), ``quantized/scales`` their float64 weight scales, and every other
array (``<op>/<field>``) is float32. The integer forward needs only the manifest and this file.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from lbq.deploy.errors import DeployError, read_json
from lbq.deploy.pack import pack_codes, packed_size, unpack_codes
from lbq.deploy.program import Program
from lbq.io import atomic_open, sha256

FORMAT = "lbq-deploy"
VERSION = 1
MANIFEST = "manifest.json"
PACKED = "packed.npz"
QONNX = "model.qonnx.onnx"


CODES = "quantized/codes"  # every quantized layer's packed codes, one after another
SCALES = "quantized/scales"  # every quantized layer's weight scale(s), float64


def _quantized_ops(ops) -> list[dict[str, Any]]:
    return [op for op in ops if op["op"] in ("qconv", "qdense")]


def packed_arrays(program: Program) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """The arrays as stored, and the operations with the offsets of their codes and scales.

    The quantized layers' codes are packed (`lbq.deploy.pack`) and concatenated into one uint8
    array, their scales into one float64 array (a few bytes per layer, and 1/n kept as exactly
    as the rescale uses it), so that the file spends its per-array header bytes once rather
    than per layer. Every other array is stored as float32, as trained.
    """
    ops = [dict(op) for op in program.ops]
    quantized = {
        f"{op['name']}/{field}" for op in _quantized_ops(ops) for field in ("codes", "scale")
    }
    stored = {
        key: np.asarray(value, np.float32)
        for key, value in program.arrays.items()
        if key not in quantized
    }
    codes, scales, code_offset, scale_offset = [], [], 0, 0
    for op in _quantized_ops(ops):
        packed = pack_codes(program.arrays[f"{op['name']}/codes"], op["bits"])
        scale = np.asarray(program.arrays[f"{op['name']}/scale"], np.float64)
        op.update(
            codes_offset=code_offset,
            codes_bytes=int(packed.size),
            scale_offset=scale_offset,
            scale_shape=list(scale.shape),
        )
        codes.append(packed)
        scales.append(scale.reshape(-1))
        code_offset += packed.size
        scale_offset += scale.size
    if codes:
        stored[CODES] = np.concatenate(codes)
        stored[SCALES] = np.concatenate(scales)
    return stored, ops


def size_report(ops, stored: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Bytes of the quantized layers and of everything, packed against float32.

    ``packed_bytes`` of a kind of layer counts its packed codes and its scales;
    ``float32_bytes`` what the same weights take as float32. ``all_float32_bytes`` is every
    parameter and BatchNorm statistic of the network as float32; ``all_stored_bytes`` the
    arrays as stored (the file adds NumPy's per-array headers).
    """
    report: dict[str, Any] = {}
    for kind, label in (("qconv", "quantized_convs"), ("qdense", "quantized_dense")):
        chosen = [op for op in ops if op["op"] == kind]
        if not chosen:
            continue
        count = sum(int(np.prod(op["shape"])) for op in chosen)
        packed = sum(op["codes_bytes"] + 8 * int(np.prod(op["scale_shape"])) for op in chosen)
        report[label] = {
            "layers": len(chosen),
            "weights": count,
            "float32_bytes": 4 * count,
            "packed_bytes": int(packed),
            "fraction_of_float32": packed / (4 * count),
        }
    weights = sum(int(np.prod(op["shape"])) for op in _quantized_ops(ops))
    floats = sum(v.size for k, v in stored.items() if k not in (CODES, SCALES))
    report["all_float32_bytes"] = 4 * (weights + floats)
    report["all_stored_bytes"] = int(sum(v.nbytes for v in stored.values()))
    report["fraction_of_float32"] = report["all_stored_bytes"] / report["all_float32_bytes"]
    return report


def array_index(stored: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in stored.items()}


def write_packed(path: str, stored: Mapping[str, np.ndarray]) -> None:
    """Writes the arrays uncompressed (the codes are already dense), via a temporary file."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **stored)


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """One network of an export folder, loaded.

    Attributes:
      folder: the export folder.
      name: the network's name ('student', 'student_w4a4', ...).
      program: operations and arrays (codes unpacked).
      dataset: the manifest's dataset entry (class_names, mean, std, image_size,
        preprocessing).
      entry: the manifest's entry for this network.
    """

    folder: str
    name: str
    program: Program
    dataset: dict[str, Any]
    entry: dict[str, Any]

    def file(self, kind: str) -> str:
        return os.path.join(self.folder, self.entry["files"][kind])


def read_manifest(folder: str) -> dict[str, Any]:
    """The manifest of an export folder.

    Raises:
      DeployError: naming the path, when the folder or its manifest is missing, unreadable,
        not JSON, or not an lbq export of a version this code reads.
    """
    if not os.path.isdir(folder):
        raise DeployError(f"model folder {folder} does not exist")
    path = os.path.join(folder, MANIFEST)
    manifest = read_json(path, f"{folder} has no {MANIFEST}: not a folder written by lbq.export")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DeployError(f"{path} is not an lbq export manifest (no format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise DeployError(
            f"{path} has format version {manifest.get('version')!r}; this lbq reads {VERSION}"
        )
    return manifest


def _checked_file(folder: str, entry: Mapping[str, Any], kind: str) -> str:
    relative = entry["files"][kind]
    path = os.path.join(folder, relative)
    if not os.path.isfile(path):
        raise DeployError(f"{path} is missing")
    expected = entry["sha256"][relative]
    if sha256(path) != expected:
        raise DeployError(f"{path} does not match its sha256 in {MANIFEST} (corrupt or changed)")
    return path


def _load_arrays(path: str, entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DeployError(f"{path} is unreadable: {error}") from None
    for key, spec in entry["arrays"].items():
        if key not in arrays:
            raise DeployError(f"{path} lacks array {key}")
        array = arrays[key]
        if str(array.dtype) != spec["dtype"] or list(array.shape) != spec["shape"]:
            raise DeployError(
                f"{path}: array {key} is {array.dtype}{list(array.shape)}, the manifest says "
                f"{spec['dtype']}{spec['shape']}"
            )
    return arrays


def unpack_program(path: str, stored: Mapping[str, np.ndarray], ops, layers) -> Program:
    """The `Program` of stored arrays (`packed_arrays`): every layer's codes unpacked.

    Raises:
      DeployError: naming ``path`` when a layer's codes or scales lie outside the stored
        arrays.
    """
    return Program(list(ops), {**stored, **_unpacked_layers(path, ops, stored)}, list(layers))


def _unpacked_layers(path: str, ops, arrays) -> dict[str, np.ndarray]:
    """{"<op>/codes": uint8 codes in the kernel's shape, "<op>/scale": float64} per layer."""
    out = {}
    for op in _quantized_ops(ops):
        count = int(np.prod(op["shape"]))
        start, length = op["codes_offset"], op["codes_bytes"]
        if length != packed_size(count, op["bits"]) or start + length > arrays[CODES].size:
            raise DeployError(f"{path}: the codes of {op['name']} lie outside {CODES}")
        packed = arrays[CODES][start : start + length]
        out[f"{op['name']}/codes"] = unpack_codes(packed, op["bits"], count).reshape(op["shape"])
        size = int(np.prod(op["scale_shape"]))
        scale = arrays[SCALES][op["scale_offset"] : op["scale_offset"] + size]
        if scale.size != size:
            raise DeployError(f"{path}: the scale of {op['name']} lies outside {SCALES}")
        out[f"{op['name']}/scale"] = scale.reshape(op["scale_shape"])
    return out


def load_model(folder: str, network: str | None = None, check_qonnx: bool = False) -> ExportedModel:
    """Loads one network of an export folder (the default network when ``network`` is None).

    Reads only the manifest and the network's packed file (and checks the QONNX file's
    checksum when ``check_qonnx``).

    Raises:
      DeployError: naming the path, for a missing or corrupt folder or file, or an unknown
        network.
    """
    folder = os.path.abspath(folder)
    manifest = read_manifest(folder)
    networks = manifest.get("networks", {})
    name = network or manifest.get("default_network")
    if name not in networks:
        raise DeployError(
            f"{os.path.join(folder, MANIFEST)} has no network {name!r}; it has {sorted(networks)}"
        )
    entry = networks[name]
    try:
        path = _checked_file(folder, entry, "packed")
        if check_qonnx:
            _checked_file(folder, entry, "qonnx")
        program = unpack_program(path, _load_arrays(path, entry), entry["ops"], entry["layers"])
    except (KeyError, TypeError) as error:
        raise DeployError(
            f"{os.path.join(folder, MANIFEST)} is incomplete for network {name!r} (missing {error})"
        ) from None
    return ExportedModel(folder, name, program, manifest["dataset"], entry)
