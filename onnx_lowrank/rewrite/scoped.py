"""Chains put in place in any scope: the main graph or a body of If, Loop or Scan, at any depth.

onnx-graphsurgeon moves outer-scope initializers into the bodies that read them when it exports
a model, so models with control flow are rewritten here on the protos themselves: each layer's
chain is built alone (`chain_protos`, through `apply_chain`), its nodes take the layer node's
place in its own graph (the body's inputs and outputs stay as they are), and its initializers go

- into the graph that held the layer's weight when that is an outer scope and every reader of
  the weight is replaced by the same chain (a weight shared by the branches of an If is
  factorized once: the chains of both branches read the same factors), else
- into the layer's own graph (a weight local to the body, or shared with a reader that keeps it).

New names are `<node name>/lowrank/...`, unique across scopes since node names are; factors
placed in an outer scope are `<weight name>/lowrank/...`, the factors of that weight for every
chain that reads them. Initializers no node reads any more are dropped, scope by scope.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import onnx_graphsurgeon as gs

from onnx_lowrank.graph import Layer, iter_graphs
from onnx_lowrank.rewrite.chain import apply_chain
from onnx_lowrank.scopes import graph_at, outer_reads, subgraphs

__all__ = ["chain_protos", "prune_initializers", "rewrite_in_scopes"]


def chain_protos(node: onnx.NodeProto, layer: Layer, chain) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The chain replacing `node` as nodes in order (reading the node's data input and bias,
    writing its output) and the initializers of its new weights."""
    tensors = {name: gs.Variable(name) for name in (*node.input, *node.output) if name}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    inputs = [tensors[name] if name else gs.Variable.empty() for name in node.input]
    original = gs.Node(node.op_type, node.name, attrs, inputs, [tensors[node.output[0]]])
    graph = gs.Graph(nodes=[original], outputs=[tensors[node.output[0]]])
    apply_chain(graph, original, layer, chain)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    exported = gs.export_onnx(graph, do_type_check=False)
    return list(exported.graph.node), list(exported.graph.initializer)


def rewrite_in_scopes(model: onnx.ModelProto, decisions: Sequence) -> onnx.ModelProto:
    """A copy of `model` with each decision's layer (`decision.layer`, `decision.chain`) replaced
    by its chain in whatever graph holds it; each new node's doc_string names its chain.

    Inner scopes are rewritten before the graphs around them: replacing a graph's nodes copies
    them, bodies included, so a body is never edited after its owner was copied.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graphs = list(iter_graphs(out.graph))
    scope_of = {node.name: path for graph, path in graphs for node in graph.node}
    owner = {t.name: path for graph, path in graphs for t in graph.initializer}
    readers = _readers(graphs)
    by_scope: dict[str | None, list] = {}
    for decision in decisions:
        by_scope.setdefault(scope_of[decision.layer.name], []).append(decision)
    placed: set[int] = set()   # id() of the chains whose factors sit in an outer scope
    for path in sorted(by_scope, key=lambda p: -1 if p is None else p.count("/"), reverse=True):
        graph = graph_at(out, path)
        replaced = {}
        for decision in by_scope[path]:
            layer, chain = decision.layer, decision.chain
            node = next(n for n in graph.node if n.name == layer.name)
            nodes, initializers = chain_protos(node, layer, chain)
            home = owner.get(layer.weight_name, path)
            if not readers[layer.weight_name] <= {d.layer.name for d in decisions if d.chain is chain}:
                home = path
            if home == path:
                graph.initializer.extend(initializers)
            else:
                renamed = {t.name: t.name.replace(f"{layer.name}/lowrank/", f"{layer.weight_name}/lowrank/", 1)
                           for t in initializers}
                for new in nodes:
                    new.input[:] = [renamed.get(name, name) for name in new.input]
                if id(chain) not in placed:
                    for tensor in initializers:
                        tensor.name = renamed[tensor.name]
                    graph_at(out, home).initializer.extend(initializers)
                    placed.add(id(chain))
            for new in nodes:
                new.doc_string = chain.describe(layer)
            replaced[layer.name] = nodes
        rebuilt = [new for node in graph.node for new in replaced.get(node.name, [node])]
        del graph.node[:]
        graph.node.extend(rebuilt)
    prune_initializers(out.graph)
    return out


def _readers(graphs) -> dict[str, set[str]]:
    """Tensor name -> the names of the nodes, in any scope, that read it."""
    found: dict[str, set[str]] = {}
    for graph, _ in graphs:
        for node in graph.node:
            for name in node.input:
                found.setdefault(name, set()).add(node.name)
    return found


def prune_initializers(graph: onnx.GraphProto) -> None:
    """Drop the initializers of `graph` and its bodies that nothing in their scope reads."""
    for node in graph.node:
        for _, sub in subgraphs(node):
            prune_initializers(sub)
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for _, sub in subgraphs(node):
            used |= outer_reads(sub)
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
