"""Load and save ONNX models: external data, an IR version the runtime accepts, atomic writes.

The input model is never modified: `save_model` refuses to write over the file it was loaded
from only at the CLI level (it cannot know), but it always writes to a temporary file in the
destination folder first and renames it into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile

import onnx
from google.protobuf.message import DecodeError

from onnx_lowrank.errors import InputError
from onnx_lowrank.files import atomic_write_pieces
from onnx_lowrank.runtime import runtime_max_ir_version
from onnx_lowrank.serialize import all_tensors, copy_field, save_with_external_data, serialized_pieces

__all__ = ["adopt_model_fields", "load_model", "save_model"]

log = logging.getLogger(__name__)

# protobuf refuses to serialise a single message over 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model, weights held in external data files included.

    Raises InputError (one line, naming the file) when the path is missing, empty, truncated,
    not an ONNX protobuf, or refers to external data that cannot be found.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an .onnx file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty, expected an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise InputError(f"{path}: not an ONNX model (no graph found)")
    if _uses_external_data(model.graph):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read its external data ({_first_line(exc)})") from None
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> pathlib.Path:
    """Write `model` to `path` atomically and return the path.

    The IR version is lowered to the highest the installed onnxruntime accepts (onnx 1.23
    writes IR 14, onnxruntime 1.31 reads at most 13); opset imports, metadata and graph
    input/output names are kept as they are. Models whose weights exceed protobuf's 2 GiB
    limit are written with their tensors in `<name>.data` beside the model.
    """
    path = pathlib.Path(path)
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: the output folder {folder} does not exist")
    ir_version = min(model.ir_version or onnx.IR_VERSION, runtime_max_ir_version())
    external = _tensor_bytes(model.graph) > EXTERNAL_DATA_THRESHOLD
    if external:
        with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.") as staging:
            staged = pathlib.Path(staging) / path.name
            data = save_with_external_data(model, staged, ir_version)
            os.replace(data, folder / data.name)
            os.replace(staged, path)
    else:
        atomic_write_pieces(path, serialized_pieces(model, ir_version))
    log.info("saved %s (IR %d, external data: %s)", path, ir_version, external)
    return path


def adopt_model_fields(target: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """`target` (a model built for the caller, e.g. by a graph rewrite) with every field but its
    graph replaced by `source`'s: opsets, IR version, producer, metadata, functions.

    Field by field, and in place: copying `source` whole would copy its weights only to replace its
    graph, and copying `target`'s graph into a fresh model would copy the new weights (each a
    transient copy of the model's size).
    """
    for field, _ in list(target.ListFields()):
        if field.name != "graph":
            target.ClearField(field.name)
    for field, value in source.ListFields():
        if field.name != "graph":
            copy_field(target, field, value)
    return target


def _uses_external_data(graph: onnx.GraphProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(graph))


def _tensor_bytes(graph: onnx.GraphProto) -> int:
    return sum(t.ByteSize() for t in all_tensors(graph))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
