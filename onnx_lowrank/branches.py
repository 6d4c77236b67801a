"""If branches decided by the inputs: views of a model with the branches that run inlined.

A *view* of a model for some feeds is the model with every If that holds layers (in a branch,
at any depth) replaced by the branch its condition selects on ALL those feeds, the branch's
nodes and initializers moved into the enclosing graph and its outputs renamed to the If's
outputs by Identity nodes; level by level, so an If inside a chosen branch is decided next. In
a view, the layers of the chosen branches are main-graph nodes with their own names and
tensors: shapes are inferred, calibration walks them and the guard probes them like any other.
An If whose condition differs between feeds, or any Loop/Scan body, stays as it is.

The conditions are evaluated by onnxruntime on the slice of the graph they depend on, so
deciding the branches costs little more than the nodes in front of them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnx_lowrank import scopes
from onnx_lowrank.graph import LAYER_OPS
from onnx_lowrank.runtime import make_session, runtime_max_ir_version

__all__ = ["View", "evaluate", "holds_layers", "specialize", "view_of"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class View:
    """A model with decided If branches inlined.

    Attributes:
        model: the view (its main graph holds the chosen branches' nodes).
        chosen: If path ("If_0", "If_0/then_branch/If_1") -> the branch attribute inlined.
        inlined: the scopes whose nodes sit in the view's main graph: None (the main graph)
            and the paths of the inlined branches.
        deciders: If path -> the graph inputs its condition was computed from (empty when forced).
    """

    model: onnx.ModelProto
    chosen: Mapping[str, str]
    inlined: frozenset
    deciders: Mapping[str, frozenset] = dataclasses.field(default_factory=dict)

    def holds(self, scope: str | None) -> bool:
        """Whether the nodes of `scope` (a layer's `subgraph`) are main-graph nodes of the view."""
        return scope in self.inlined


def holds_layers(graph: onnx.GraphProto) -> bool:
    """Whether `graph` or a body inside it has a Conv/ConvTranspose/Gemm/MatMul node."""
    return any(node.op_type in LAYER_OPS or any(holds_layers(sub) for _, sub in scopes.subgraphs(node))
               for node in graph.node)


def specialize(model: onnx.ModelProto, feeds: Sequence[dict], forced: Mapping[str, str] | None = None) -> View:
    """The view of `model` for `feeds`: each If holding layers inlined with the branch its
    condition selects on every feed (or the branch `forced` names for its path); an If whose
    condition differs between the feeds is left in place."""
    forced = dict(forced or {})
    view = onnx.ModelProto()
    view.CopyFrom(model)
    origin: dict[str, str | None] = {node.name: None for node in view.graph.node}
    chosen: dict[str, str] = {}
    inlined: set = {None}
    undecided: set[str] = set()
    deciders: dict[str, frozenset] = {}
    while True:
        pending = [node for node in view.graph.node if node.op_type == "If" and node.name not in undecided
                   and any(holds_layers(sub) for _, sub in scopes.subgraphs(node))]
        if not pending:
            break
        conditions = {node.name: node.input[0] for node in pending}
        paths = {name: _path(origin[name], name) for name in conditions}
        asked = [conditions[name] for name in conditions if paths[name] not in forced]
        values = evaluate(view, asked, feeds) if asked else {}
        for name, condition in conditions.items():
            path = paths[name]
            branch = forced.get(path) or _branch(values[condition])
            if branch is None:
                log.info("If '%s': the inputs take both branches; its layers are left to the whole model", path)
                undecided.add(name)
                continue
            body_path = f"{path}/{branch}"
            added = _inline(view.graph, name, branch)
            origin.update(dict.fromkeys(added, body_path))
            chosen[path] = branch
            inlined.add(body_path)
            deciders[path] = frozenset() if path in forced else _reads(view.graph, condition)
    return View(view, chosen, frozenset(inlined), deciders)


def view_of(model: onnx.ModelProto, feeds: Sequence[dict]) -> View:
    """`specialize(model, feeds)`; a model without control flow is its own view (not copied)."""
    if not scopes.has_control_flow(model):
        return View(model, {}, frozenset({None}))
    return specialize(model, feeds)


def _path(scope: str | None, node: str) -> str:
    return node if scope is None else f"{scope}/{node}"


def _branch(conditions: list[np.ndarray]) -> str | None:
    taken = {bool(np.asarray(c).reshape(-1)[0]) for c in conditions}
    return None if len(taken) != 1 else ("then_branch" if taken.pop() else "else_branch")


def _inline(graph: onnx.GraphProto, name: str, branch: str) -> list[str]:
    """Replace the If node `name` of `graph` by the nodes of its `branch`; return their names."""
    position = next(i for i, node in enumerate(graph.node) if node.name == name)
    node = onnx.NodeProto()
    node.CopyFrom(graph.node[position])
    body = next(sub for attribute, sub in scopes.subgraphs(node) if attribute == branch)
    renames = [onnx.helper.make_node("Identity", [inner.name], [outer], name=f"{node.name}/{branch}/output_{i}")
               for i, (inner, outer) in enumerate(zip(body.output, node.output, strict=True))]
    new_nodes = [*body.node, *renames]
    nodes = list(graph.node)
    nodes[position:position + 1] = new_nodes
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(body.initializer)
    graph.value_info.extend(body.value_info)
    return [n.name for n in new_nodes]


def evaluate(model: onnx.ModelProto, names: list[str], feeds: Sequence[dict]) -> dict[str, list[np.ndarray]]:
    """The tensors `names` of the main graph on each feed, running only the nodes they need."""
    sliced = _slice(model, names)
    session = make_session(sliced, "cpu", produced=True, optimize=False, label="the branch conditions")
    wanted = [i.name for i in session.get_inputs()]
    found: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, {n: np.asarray(feed[n]) for n in wanted}), strict=True):
            found[name].append(value)
    return found


def _reads(graph: onnx.GraphProto, name: str) -> frozenset:
    """The graph inputs the main-graph tensor `name` is computed from."""
    needed = _needed(graph, [name])[1]
    return frozenset(value.name for value in graph.input if value.name in needed)


def _slice(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The main-graph nodes `names` depend on, as a model with those outputs."""
    graph = model.graph
    kept, needed = _needed(graph, names)
    nodes = [node for index, node in enumerate(graph.node) if index in kept]
    inputs = [value for value in graph.input if value.name in needed]
    initializers = [t for t in graph.initializer if t.name in needed]
    sliced = onnx.helper.make_graph(nodes, "conditions", inputs, [onnx.ValueInfoProto(name=n) for n in names],
                                    initializers)
    out = onnx.helper.make_model(sliced, opset_imports=model.opset_import)
    out.ir_version = min(model.ir_version, runtime_max_ir_version())
    return out


def _needed(graph: onnx.GraphProto, names: list[str]) -> tuple[set[int], set[str]]:
    """The positions of the main-graph nodes `names` depend on, and every name they read."""
    producers = {o: index for index, node in enumerate(graph.node) for o in node.output}
    needed, stack = set(), list(names)
    kept: set[int] = set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        index = producers.get(name)
        if index is not None and index not in kept:
            kept.add(index)
            node = graph.node[index]
            stack.extend(n for n in node.input if n)
            for _, sub in scopes.subgraphs(node):
                stack.extend(scopes.outer_reads(sub))
    return kept, needed
