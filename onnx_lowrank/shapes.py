"""Concrete tensor shapes of a model: ONNX shape inference on a weightless copy, onnxruntime for the rest.

Inference reads weights' shapes, not their values, so it runs on `without_weights`' copy (small
however large the model: protobuf cannot serialise 2 GiB or more, which inference does); tensors
it leaves unresolved are read off one onnxruntime run of the model with random inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx

from onnx_lowrank.graph import iter_graphs, with_outputs
from onnx_lowrank.model import adopt_model_fields

__all__ = ["INFERENCE_WEIGHT_BYTES", "infer_shapes", "without_weights"]

log = logging.getLogger(__name__)

#: Initializers larger than this are left out of the copies shape inference reads.
INFERENCE_WEIGHT_BYTES = 1 << 10


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` for ONNX shape inference: every main-graph initializer of more than
    `INFERENCE_WEIGHT_BYTES` becomes a typed graph input of its shape. Inference reads their shapes,
    not their values, and the copy stays small: protobuf cannot serialise a model of 2 GiB or more,
    which shape inference does."""
    large = {t.name for t in model.graph.initializer
             if len(t.raw_data) > INFERENCE_WEIGHT_BYTES or t.data_location == onnx.TensorProto.EXTERNAL
             or sum(len(f) for f in (t.float_data, t.double_data, t.int64_data, t.int32_data)) * 4
             > INFERENCE_WEIGHT_BYTES}
    copy = adopt_model_fields(onnx.ModelProto(), model)
    graph = model.graph
    copy.graph.name = graph.name
    for name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(copy.graph, name).extend(getattr(graph, name))
    copy.graph.initializer.extend(t for t in graph.initializer if t.name not in large)
    listed = {i.name for i in graph.input}
    copy.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                            for t in graph.initializer if t.name in large and t.name not in listed)
    return copy


def infer_shapes(model: onnx.ModelProto, pinned: Mapping[str, tuple[int, ...]] | None = None,
                 need: set[str] | None = None, seed: int = 0,
                 values: Mapping[str, np.ndarray] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the model's tensors, by name.

    ONNX shape inference runs on a copy whose dynamic input dimensions are pinned (`pinned`, and
    batch 1 by default) and whose large weights are typed inputs (`without_weights`). Tensors in
    `need` that inference leaves unresolved are read off one onnxruntime run of the model itself,
    weights included, with random inputs (pinned `values` set: `pins`), which exposes them as
    extra graph outputs.
    """
    from onnx_lowrank import inputs as model_inputs
    from onnx_lowrank.pins import without_pinned

    specs = without_pinned(model_inputs.input_specs(model), values or {})
    concrete = model_inputs.resolve_shapes(specs, dict(pinned or {}))
    probe = without_weights(model)
    for value in probe.graph.input:
        if value.name in concrete:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, concrete[value.name]):
                dim.Clear()
                dim.dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is best effort; onnxruntime fills the gaps
        log.info("ONNX shape inference failed (%s); using onnxruntime for shapes", exc)
        inferred = probe
    shapes: dict[str, tuple[int, ...]] = {}
    for graph, _ in iter_graphs(inferred.graph):
        for value in (*graph.input, *graph.value_info, *graph.output):
            shape = _static_shape(value)
            if shape is not None:
                shapes[value.name] = shape
        for init in graph.initializer:
            shapes[init.name] = tuple(init.dims)
    missing = sorted((need or set()) - shapes.keys())
    if missing:
        shapes.update(_runtime_shapes(model, missing, specs, concrete, seed, values or {}))
    return shapes


def _static_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    dims = value.type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def _runtime_shapes(model: onnx.ModelProto, names: list[str], specs, concrete, seed: int, values
                    ) -> dict[str, tuple[int, ...]]:
    from onnx_lowrank import inputs as model_inputs
    from onnx_lowrank.pins import with_values
    from onnx_lowrank.runtime import make_session

    main_tensors = {o for n in model.graph.node for o in n.output}
    exposed = [n for n in names if n in main_tensors]
    if not exposed:
        return {}
    try:
        session = make_session(with_outputs(model, exposed), "cpu", produced=False, optimize=False, label="the model")
        feed = with_values(model_inputs.random_feeds(specs, concrete, count=1, seed=seed), values,
                           model_inputs.input_specs(model))[0]
        values = session.run(exposed, feed)
    except Exception as exc:  # noqa: BLE001 - reported as unknown shapes, not a crash
        log.warning("could not run the model to read shapes: %s", str(exc).splitlines()[0])
        return {}
    return {name: tuple(v.shape) for name, v in zip(exposed, values)}
