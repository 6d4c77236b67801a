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
from collections.abc import Callable, Iterator

import onnx
from google.protobuf.message import DecodeError

from onnx_lowrank.errors import InputError
from onnx_lowrank.files import atomic_write_pieces
from onnx_lowrank.runtime import runtime_max_ir_version

__all__ = ["adopt_model_fields", "load_model", "save_model", "serialized_pieces"]

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
        to_write = onnx.ModelProto()
        to_write.CopyFrom(model)  # the conversion to external data rewrites the tensors in place
        to_write.ir_version = ir_version
        with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.") as staging:
            staged = pathlib.Path(staging) / path.name
            data_name = f"{path.name}.data"
            onnx.save_model(to_write, str(staged), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(pathlib.Path(staging) / data_name, folder / data_name)
            os.replace(staged, path)
    else:
        atomic_write_pieces(path, serialized_pieces(model, ir_version))
    log.info("saved %s (IR %d, external data: %s)", path, ir_version, external)
    return path


def serialized_pieces(model: onnx.ModelProto, ir_version: int) -> Iterator[bytes]:
    """The bytes of `model.SerializeToString()` with `ir_version` set, in pieces: no copy of the
    model and no bytes of the whole model are ever held, one graph element at a time.

    Protobuf writes a message's fields in field-number order, a repeated message field as one
    ``key · length · element`` record per element, and a nested message as ``key · length ·
    its fields``; the pieces follow that encoding, so their concatenation is byte-identical.
    """
    graph_field = model.DESCRIPTOR.fields_by_name["graph"].number
    before, after = onnx.ModelProto(), onnx.ModelProto()
    for field, value in model.ListFields():
        if field.number != graph_field:
            _copy_field(before if field.number < graph_field else after, field, value)
    before.ir_version = ir_version
    yield before.SerializeToString()
    if model.HasField("graph"):
        records = list(_field_records(model.graph))
        yield _key(graph_field) + _varint(sum(size for size, _ in records))
        for _, record in records:
            yield record()
    yield after.SerializeToString()


def _field_records(message) -> Iterator[tuple[int, Callable[[], bytes]]]:
    """Each field of `message` (each element of a repeated message field) as (encoded size,
    a function that encodes it), in field-number order."""
    for field, value in message.ListFields():
        if hasattr(value, "add"):             # a repeated message field
            head = _key(field.number)
            for element in value:
                size = element.ByteSize()
                yield (len(head) + len(_varint(size)) + size,
                       lambda head=head, element=element, size=size: head + _varint(size) + element.SerializeToString())
        else:
            alone = type(message)()
            _copy_field(alone, field, value)
            encoded = alone.SerializeToString()
            yield len(encoded), lambda encoded=encoded: encoded


def _copy_field(target, field, value) -> None:
    if hasattr(value, "extend"):          # a repeated field
        getattr(target, field.name).extend(value)
    elif hasattr(value, "CopyFrom"):      # a message
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _key(number: int) -> bytes:
    return _varint(number << 3 | 2)   # wire type 2: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


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
            _copy_field(target, field, value)
    return target


def _uses_external_data(graph: onnx.GraphProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(graph))


def _tensor_bytes(graph: onnx.GraphProto) -> int:
    return sum(t.ByteSize() for t in _all_tensors(graph))


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
