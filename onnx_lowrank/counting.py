"""Layers of a model with control flow: their shapes in every body and how the totals count them.

The cost of one model run depends on the branches it takes and the iterations it makes. Each
layer's own MACs are those of one execution; its `runs` say how often the totals count it:
- an If branch counts once when it is the branch the pinned inputs take (`--input-value`,
  e.g. sr=16000, when the If's condition is computed from a pinned input), 0 times when it is the
  other; without a pin deciding it, the branch with the larger cost counts (the most a run can cost);
- a Loop body counts once per iteration when the trip count is a constant (else once, said so),
  a Scan body once per element of the scanned axis.
Shapes inside the branches come from views (`branches.specialize`): the taken branches on a
random feed with the pinned values, then each other branch forced in turn.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx

from onnx_lowrank import branches, inputs, scopes
from onnx_lowrank.graph import LAYER_OPS, Layer, find_layers
from onnx_lowrank.pins import describe_values, with_values, without_pinned
from onnx_lowrank.shapes import infer_shapes

__all__ = ["Discovery", "discover"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Discovery:
    """Shapes by tensor name, the layers (with `runs` and `scope` set), and how the totals count
    control flow in words (None without control flow)."""

    shapes: dict
    layers: list[Layer]
    counting: str | None


def discover(model: onnx.ModelProto, pinned: Mapping, values: Mapping[str, np.ndarray], need: set[str],
             seed: int = 0) -> Discovery:
    """Infer shapes (in every body where a view reaches it) and find the layers with their costs.

    Without control flow this is `shapes.infer_shapes` then `graph.find_layers`, nothing more.
    """
    if not scopes.has_control_flow(model):
        shapes = infer_shapes(model, pinned, need=need, seed=seed, values=values)
        return Discovery(shapes, find_layers(model, shapes), None)
    specs = inputs.input_specs(model)
    free = without_pinned(specs, values)
    feed = with_values(inputs.random_feeds(free, inputs.resolve_shapes(free, pinned), count=1, seed=seed), values,
                       specs)
    taken = branches.specialize(model, feed)
    shapes = infer_shapes(model, pinned, need=need, seed=seed, values=values)
    for forced in (*_other_branches(model, taken), None):
        shapes.update(_view_shapes(model, feed, forced, taken, pinned, shapes, seed, values))
    layers = find_layers(model, shapes)
    decided = {path: branch for path, branch in taken.chosen.items() if taken.deciders[path] & values.keys()}
    deciding = set().union(*(taken.deciders[path] for path in decided))
    counting = _annotate(model, layers, shapes, decided,
                         describe_values({name: v for name, v in values.items() if name in deciding}))
    return Discovery(shapes, layers, counting)


def _view_shapes(model: onnx.ModelProto, feed: list[dict], forced: dict | None, taken: branches.View, pinned,
                 known: Mapping, seed: int, values) -> dict:
    """Shapes in the view with the `forced` branches (the `taken` view for None): inferred, then
    each layer's tensors that inference leaves open run on the slice of the view computing them
    (a layer after a node that fails on a forced branch's unusual input keeps unknown shapes)."""
    try:
        view = taken if forced is None else branches.specialize(model, feed, forced)
    except Exception as exc:  # noqa: BLE001 - the model's own failure on a forced branch
        log.info("shapes in the branches %s unknown: deciding the others failed (%s)", forced, _first_line(exc))
        return {}
    shapes = infer_shapes(view.model, pinned, seed=seed, values=values)
    for group in _layer_tensors(view.model):
        missing = sorted(group - shapes.keys() - known.keys())
        if not missing:
            continue
        try:
            found = branches.evaluate(view.model, missing, feed)
        except Exception as exc:  # noqa: BLE001 - as above: this layer's shapes stay unknown
            log.info("shapes of %s unknown: computing them failed (%s)", ", ".join(missing), _first_line(exc))
            continue
        shapes.update({name: tuple(value[0].shape) for name, value in found.items()})
    return shapes


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _layer_tensors(model: onnx.ModelProto) -> list[set[str]]:
    """The inputs and output of each main-graph layer node."""
    return [{t for t in (*node.input[:2], node.output[0]) if t} for node in model.graph.node
            if node.op_type in LAYER_OPS]


def _other_branches(model: onnx.ModelProto, taken: branches.View) -> list[dict[str, str]]:
    """Per If branch that holds layers and is not inlined in `taken`: the forced choices (its If
    and every If above it) that inline it."""
    found = []
    all_bodies = scopes.bodies(model)
    for path, body in all_bodies.items():
        if body.op != "If" or taken.holds(path) or not branches.holds_layers(scopes.graph_at(model, path)):
            continue
        forced, scope = {}, path
        while scope is not None and all_bodies[scope].op == "If":
            owner = all_bodies[scope]
            forced[_if_path(owner)] = owner.attribute
            scope = owner.parent
        if scope is None:
            found.append(forced)
    return found


def _if_path(body: scopes.Body) -> str:
    return body.node if body.parent is None else f"{body.parent}/{body.node}"


def _annotate(model: onnx.ModelProto, layers: list[Layer], shapes: Mapping, decided: Mapping[str, str],
              pins: str) -> str:
    """Set each body layer's `runs` and `scope`; return how the totals count control flow."""
    all_bodies = scopes.bodies(model)
    own: dict[str | None, int] = {}
    for layer in layers:
        own[layer.subgraph] = own.get(layer.subgraph, 0) + (layer.macs or 0)
    children: dict[str | None, list[scopes.Body]] = {}
    for body in all_bodies.values():
        children.setdefault(body.parent, []).append(body)

    def trips(body: scopes.Body) -> int | None:
        if body.op == "Scan":
            return _scan_length(model, body, shapes)
        return scopes.trip_count(model, body)

    def cost(scope: str | None) -> int:
        total = own.get(scope, 0)
        by_node: dict[str, list[scopes.Body]] = {}
        for body in children.get(scope, []):
            by_node.setdefault(body.node, []).append(body)
        for group in by_node.values():
            total += max(cost(b.path) * _factor(b, counted(group), trips(b)) for b in group)
        return total

    def counted(group: list[scopes.Body]) -> str:
        """The branch of an If that the totals count (`group`: its bodies)."""
        path = _if_path(group[0])
        return decided.get(path) or max(group, key=lambda b: cost(b.path)).attribute

    notes: dict[str | None, tuple[int, str | None]] = {None: (1, None)}
    for path, body in all_bodies.items():   # outer bodies come first
        runs, note = notes[body.parent]
        group = [b for b in children[body.parent] if b.node == body.node]
        count = trips(body)
        factor = _factor(body, counted(group), count)
        text = _describe(body, counted(group), count, _if_path(body) in decided, pins)
        notes[path] = (runs * factor, text if note is None else f"{note}; {text}")
    for layer in layers:
        layer.runs, layer.scope = notes[layer.subgraph]
    if decided:
        return f"If branches: those taken for {pins}; Loop/Scan bodies: once per iteration"
    return "If branches: the costlier branch of each If (no --input-value decides them); Loop/Scan bodies: " \
           "once per iteration"


def _factor(body: scopes.Body, counted_branch: str, count: int | None) -> int:
    if body.op == "If":
        return int(body.attribute == counted_branch)
    return count if count is not None else 1


def _describe(body: scopes.Body, counted_branch: str, count: int | None, decided: bool, pins: str) -> str:
    where = body.describe()
    if body.op == "If":
        if body.attribute == counted_branch:
            return f"{where}, taken for {pins}" if decided else f"{where}, counted (the costlier branch)"
        return (f"{where}, not taken for {pins} (not counted)" if decided
                else f"{where}, not counted (the other branch costs more)")
    if count is None:
        return f"{where}, trip count unknown: counted once"
    return f"{where}, {count} iterations"


def _scan_length(model: onnx.ModelProto, body: scopes.Body, shapes: Mapping) -> int | None:
    """The length of a Scan's first scanned input along its scan axis, when its shape is known."""
    node = next(n for n in scopes.graph_at(model, body.parent).node if n.name == body.node)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    scanned = int(attrs["num_scan_inputs"])
    first = node.input[len(node.input) - scanned]
    axis = (list(attrs.get("scan_input_axes", [])) or [0])[0]
    shape = shapes.get(first)
    return None if shape is None else shape[axis]
