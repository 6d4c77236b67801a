"""Control-flow bodies (If branches, Loop and Scan bodies) and the names they see.

A *scope* is the main graph (path None) or a body, named by its path "node/attribute" from the
main graph down (`graph.iter_graphs`), e.g. "If_0/then_branch" or "If_0/else_branch/loop/body".
A body reads its own tensors and initializers and, by name, any tensor of the scopes around it
(outer-scope references).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["Body", "bodies", "graph_at", "has_control_flow", "outer_reads", "subgraphs", "trip_count"]

#: The operators whose graph attributes are bodies.
CONTROL_FLOW = ("If", "Loop", "Scan")


@dataclasses.dataclass(frozen=True)
class Body:
    """One body: its path, the node that owns it (its op and name), the attribute, the parent scope."""

    path: str
    op: str
    node: str
    attribute: str
    parent: str | None

    def describe(self) -> str:
        """Plain words: "the then_branch of If 'If_0'", "the body of Loop 'loop'"."""
        part = self.attribute if self.op == "If" else "body"
        return f"the {part} of {self.op} '{self.node}'"


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) of every graph attribute of `node`."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.name, attr.g
        for graph in attr.graphs:
            yield attr.name, graph


def bodies(model: onnx.ModelProto) -> dict[str, Body]:
    """Every body of the model by path, outer bodies before the bodies inside them."""
    found: dict[str, Body] = {}

    def visit(graph: onnx.GraphProto, path: str | None) -> None:
        for node in graph.node:
            for attribute, sub in subgraphs(node):
                sub_path = f"{node.name}/{attribute}" if path is None else f"{path}/{node.name}/{attribute}"
                found[sub_path] = Body(sub_path, node.op_type, node.name, attribute, path)
                visit(sub, sub_path)

    visit(model.graph, None)
    return found


def has_control_flow(model: onnx.ModelProto) -> bool:
    """Whether any node of the main graph holds a body."""
    return any(True for node in model.graph.node for _ in subgraphs(node))


def graph_at(model: onnx.ModelProto, path: str | None) -> onnx.GraphProto:
    """The graph of scope `path` (the main graph for None), inside `model` (edits stick)."""
    graph = model.graph
    if path is None:
        return graph
    body = bodies(model)[path]
    parent = graph_at(model, body.parent)
    node = next(n for n in parent.node if n.name == body.node)
    return next(sub for attribute, sub in subgraphs(node) if attribute == body.attribute)


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names `graph` (or a body inside it) reads that it does not define: outer-scope references."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {o for node in graph.node for o in node.output}
    reads = {o.name for o in graph.output}
    for node in graph.node:
        reads.update(name for name in node.input if name)
        for _, sub in subgraphs(node):
            reads |= outer_reads(sub)
    return reads - defined


def trip_count(model: onnx.ModelProto, body: Body) -> int | None:
    """How many times a Loop body runs when its trip count `M` is a constant and no condition
    stops it early (no `cond` input, or the body passes its condition through unchanged); None
    otherwise (Scan bodies: see `branches.body_runs`, which knows the scanned input's shape)."""
    if body.op != "Loop":
        return None
    parent = graph_at(model, body.parent)
    node = next(n for n in parent.node if n.name == body.node)
    sub = graph_at(model, body.path)
    constants = _constants_in_scope(model, body.parent)
    if not node.input or not node.input[0] or node.input[0] not in constants:
        return None
    stops_early = len(node.input) > 1 and node.input[1] and not _passes_condition(sub)
    return None if stops_early else int(constants[node.input[0]].reshape(-1)[0])


def _passes_condition(body: onnx.GraphProto) -> bool:
    """Whether the body's condition output is its condition input (directly or via Identity)."""
    cond_in, cond_out = body.input[1].name, body.output[0].name
    producers = {o: n for n in body.node for o in n.output}
    name = cond_out
    while name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    return name == cond_in


def _constants_in_scope(model: onnx.ModelProto, path: str | None) -> dict[str, np.ndarray]:
    """Initializers visible in scope `path` (its own and its ancestors'), as arrays."""
    found: dict[str, np.ndarray] = {}
    all_bodies = bodies(model)
    chain, scope = [], path
    while True:
        chain.append(scope)
        if scope is None:
            break
        scope = all_bodies[scope].parent
    for scope in reversed(chain):
        found.update({t.name: numpy_helper.to_array(t) for t in graph_at(model, scope).initializer})
    return found
