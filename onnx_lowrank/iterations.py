"""Layer inputs inside Loop and Scan bodies, gathered by running the body once per iteration.

onnxruntime does not expose the tensors of a body, so a Loop or Scan node of a view's main graph
(`branches.View`) is re-enacted: one run of the view gives the node's inputs and the outer-scope
values its body reads; the body then runs as a model of its own, iteration after iteration, with
the loop-carried values fed back (a Loop until its trip count or its condition stops it, a Scan
over its scanned inputs' axis), and outputs the inputs of its layers. Every iteration of every
calibration feed is one batch of a layer's input: the statistics of the data-aware fit.

Handled: Loop and Scan nodes of the view's main graph, Scan inputs scanned forward on axis 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from onnx_lowrank import scopes
from onnx_lowrank.graph import Layer
from onnx_lowrank.runtime import make_session, runtime_max_ir_version

__all__ = ["gather"]


def gather(view, model: onnx.ModelProto, layers: Sequence[Layer], feeds: Sequence[dict]) -> dict[str, list[np.ndarray]]:
    """Layer name -> its data input in every iteration over `feeds`, for the `layers` (of the
    canonical `model`) whose Loop or Scan body `body_inputs` can run in `view`."""
    all_bodies = scopes.bodies(model)
    by_body: dict[str, list[Layer]] = {}
    for layer in layers:
        body = all_bodies.get(layer.subgraph)
        if body is not None and _runnable(view, body):
            by_body.setdefault(body.path, []).append(layer)
    found: dict[str, list[np.ndarray]] = {}
    for path, inside in by_body.items():
        found.update(body_inputs(view.model, all_bodies[path], inside, feeds))
    return found


def _runnable(view, body: scopes.Body) -> bool:
    """A Loop, or a Scan over axis 0 forward, whose node sits in the view's main graph."""
    if body.op not in ("Loop", "Scan") or not view.holds(body.parent):
        return False
    node = _node(view.model, body.node)
    if node is None or body.op == "Loop":
        return node is not None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return not any(attrs.get(key) for key in ("scan_input_directions", "scan_input_axes"))


def body_inputs(view_model: onnx.ModelProto, body: scopes.Body, layers: Sequence[Layer],
                feeds: Sequence[dict]) -> dict[str, list[np.ndarray]]:
    """Layer name -> its data input in every iteration of the body, over all `feeds`."""
    node = _node(view_model, body.node)
    graph = next(sub for attribute, sub in scopes.subgraphs(node) if attribute == body.attribute)
    constants = {t.name: t for t in view_model.graph.initializer}
    outer = sorted(scopes.outer_reads(graph) - constants.keys())
    wanted = list(dict.fromkeys([name for name in node.input if name and name not in constants] + outer))
    data = {layer.name: _data_input(layer) for layer in layers}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(view_model)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in known)
    whole = make_session(exposed, "cpu", produced=True, optimize=False, label="the model before a Loop/Scan")
    step = None
    found: dict[str, list[np.ndarray]] = {layer.name: [] for layer in layers}
    for feed in feeds:
        values = dict(zip(wanted, whole.run(wanted, feed), strict=True))
        values.update({name: onnx.numpy_helper.to_array(t) for name, t in constants.items()})
        if step is None:
            step = make_session(_body_model(view_model, graph, outer, list(data.values()), values, constants),
                                "cpu", produced=True, optimize=False, label=f"{body.describe()}, run alone")
        run = _loop if body.op == "Loop" else _scan
        for produced in run(step, node, graph, outer, values, list(data.values())):
            for layer in layers:
                found[layer.name].append(produced[data[layer.name]])
    return found


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if n.name == name), None)


def _data_input(layer: Layer) -> str:
    return layer.inputs[1] if layer.op == "MatMul" and layer.weight_side == "left" else layer.inputs[0]


def _body_model(model: onnx.ModelProto, graph: onnx.GraphProto, outer: list[str], extra: list[str],
                values: dict, constants: dict) -> onnx.ModelProto:
    """The body as a model: its inputs, then the outer-scope values it reads as inputs too (outer
    initializers as its own); its outputs, then the tensors `extra`."""
    inputs = list(graph.input) + [onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(values[name]).dtype), None) for name in outer]
    declared = {o.name for o in graph.output}
    outputs = list(graph.output) + [onnx.ValueInfoProto(name=name) for name in dict.fromkeys(extra)
                                    if name not in declared]
    reads = scopes.outer_reads(graph)
    initializers = list(graph.initializer) + [t for name, t in constants.items() if name in reads]
    alone = onnx.helper.make_graph(graph.node, "body", inputs, outputs, initializers)
    built = onnx.helper.make_model(alone, opset_imports=model.opset_import)
    built.ir_version = min(model.ir_version, runtime_max_ir_version())
    return built


def _loop(step, node, graph, outer, values, extra):
    """Each iteration's `extra` tensors of a Loop: `v` carried, until the trip count or the condition stops."""
    trips = values[node.input[0]] if node.input[0] else None
    cond = np.asarray(values[node.input[1]]) if len(node.input) > 1 and node.input[1] else np.array(True)
    carried = [values[name] for name in node.input[2:]]
    names = [i.name for i in graph.input]
    outputs = list(dict.fromkeys([o.name for o in graph.output] + extra))
    count = len(carried)
    i = 0
    while bool(cond) and (trips is None or i < int(np.asarray(trips).reshape(-1)[0])):
        feed = dict(zip(names, [np.array(i, np.int64), np.asarray(cond, bool), *carried], strict=True))
        feed.update({name: values[name] for name in outer})
        result = dict(zip(outputs, step.run(outputs, feed), strict=True))
        cond = result[outputs[0]]
        carried = [result[name] for name in outputs[1:1 + count]]
        yield result
        i += 1


def _scan(step, node, graph, outer, values, extra):
    """Each iteration's `extra` tensors of a forward Scan over axis 0: states carried."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    scanned = int(attrs["num_scan_inputs"])
    states = [values[name] for name in node.input[:len(node.input) - scanned]]
    sequences = [values[name] for name in node.input[len(node.input) - scanned:]]
    names = [i.name for i in graph.input]
    outputs = list(dict.fromkeys([o.name for o in graph.output] + extra))
    for t in range(len(sequences[0])):
        feed = dict(zip(names, [*states, *(s[t] for s in sequences)], strict=True))
        feed.update({name: values[name] for name in outer})
        result = dict(zip(outputs, step.run(outputs, feed), strict=True))
        states = [result[name] for name in outputs[:len(states)]]
        yield result
