"""Models written piece by piece: no copy of the model and no bytes of the whole model.

Protobuf writes a message's fields in field-number order, a repeated message field as one
``key · length · element`` record per element, and a nested message as ``key · length · its
fields``. `serialized_pieces` follows that encoding, so the concatenation of its pieces is
byte-identical to ``SerializeToString()``; `save_with_external_data` uses the same encoding with
each large tensor replaced by a reference into a data file (ONNX external data), which is how a
model over protobuf's 2 GiB limit is written. Neither changes the model it writes.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator

import onnx

from onnx_lowrank.files import atomic_write_pieces

__all__ = ["EXTERNAL_SIZE_THRESHOLD", "all_tensors", "copy_field", "save_with_external_data", "serialized_pieces"]

#: Tensors of at least this many raw bytes go to the data file (onnx's own default is 1 KiB too).
EXTERNAL_SIZE_THRESHOLD = 1024

Record = tuple[int, Callable[[], Iterator[bytes]]]
#: A tensor -> the tensor to write in its place (itself, or a reference into the data file).
Stub = Callable[[onnx.TensorProto], onnx.TensorProto]

# The messages that can hold tensors, which an external-data write descends into.
_HOLDERS = (onnx.GraphProto, onnx.NodeProto, onnx.AttributeProto)


def serialized_pieces(model: onnx.ModelProto, ir_version: int, stub: Stub | None = None) -> Iterator[bytes]:
    """The bytes of `model.SerializeToString()` with `ir_version` set, one graph element at a time.

    `stub`, when given, is asked for every tensor in the graph (initializers, node attributes and
    bodies, at any depth) and its answer is written in the tensor's place.
    """
    graph_field = model.DESCRIPTOR.fields_by_name["graph"].number
    before, after = onnx.ModelProto(), onnx.ModelProto()
    for field, value in model.ListFields():
        if field.number != graph_field:
            copy_field(before if field.number < graph_field else after, field, value)
    before.ir_version = ir_version
    yield before.SerializeToString()
    if model.HasField("graph"):
        records = list(_field_records(model.graph, stub))
        yield _key(graph_field) + _varint(sum(size for size, _ in records))
        for _, pieces in records:
            yield from pieces()
    yield after.SerializeToString()


def save_with_external_data(model: onnx.ModelProto, path: str | os.PathLike, ir_version: int,
                            threshold: int = EXTERNAL_SIZE_THRESHOLD) -> pathlib.Path:
    """Write `model` to `path` and the raw bytes of each of its tensors of `threshold` bytes or
    more, in order, to `<path name>.data` beside it; each such tensor is written in the model as a
    reference (location, offset, length) into that file. Returns the data file's path. (Each file
    is written whole or not at all; a caller replacing an existing pair stages both: `model.save_model`.)

    Unlike ``onnx.save(..., save_as_external_data=True)``, the model is left as it is (that call
    moves the tensors out of the model it is given) and is never copied.
    """
    path = pathlib.Path(path)
    data_path = path.with_name(f"{path.name}.data")
    moved: list[onnx.TensorProto] = []
    offset = 0

    def reference(tensor: onnx.TensorProto) -> onnx.TensorProto:
        nonlocal offset
        if not tensor.HasField("raw_data"):
            return tensor
        length = len(tensor.raw_data)
        if length < threshold:
            return tensor
        stub = onnx.TensorProto()
        for field, value in tensor.ListFields():
            if field.name not in ("raw_data", "external_data", "data_location"):
                copy_field(stub, field, value)
        for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
            stub.external_data.add(key=key, value=value)
        stub.data_location = onnx.TensorProto.EXTERNAL
        moved.append(tensor)
        offset += length
        return stub

    pieces = list(serialized_pieces(model, ir_version, reference))
    atomic_write_pieces(data_path, (tensor.raw_data for tensor in moved))
    atomic_write_pieces(path, pieces)
    return data_path


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of `graph`: its initializers and its nodes' tensor attributes, bodies included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from all_tensors(attr.g)
            for sub in attr.graphs:
                yield from all_tensors(sub)


def _field_records(message, stub: Stub | None) -> Iterator[Record]:
    """Each field of `message` (each element of a repeated message field) as (encoded size, a
    function giving its encoded pieces), in field-number order."""
    for field, value in message.ListFields():
        if field.message_type is not None:
            elements = value if hasattr(value, "add") else (value,)   # a repeated message field, or one message
            for element in elements:
                yield _element_record(field.number, element, stub)
        else:
            alone = type(message)()
            copy_field(alone, field, value)
            encoded = alone.SerializeToString()
            yield len(encoded), lambda encoded=encoded: iter((encoded,))


def _element_record(number: int, element, stub: Stub | None) -> Record:
    """One message-valued field element: whole, or (with a stub) field by field where it can hold tensors."""
    head = _key(number)
    if stub is not None and isinstance(element, onnx.TensorProto):
        element = stub(element)
    if stub is not None and isinstance(element, _HOLDERS):
        inner = list(_field_records(element, stub))
        size = sum(s for s, _ in inner)
        start = head + _varint(size)

        def pieces() -> Iterator[bytes]:
            yield start
            for _, piece in inner:
                yield from piece()
        return len(start) + size, pieces
    size = element.ByteSize()
    return (len(head) + len(_varint(size)) + size,
            lambda: iter((head + _varint(size) + element.SerializeToString(),)))


def copy_field(target, field, value) -> None:
    """Set `field` of the message `target` to `value` (a scalar, a message or a repeated field)."""
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
