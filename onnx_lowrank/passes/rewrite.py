"""The rewrite pass: factorized layers replaced by their chains (or projected weights), checked."""

from __future__ import annotations

import json
import logging

import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnx_lowrank import __version__
from onnx_lowrank.config import Settings
from onnx_lowrank.fitting import chain_kernel
from onnx_lowrank.graph import iter_graphs
from onnx_lowrank.shapes import without_weights
from onnx_lowrank.model import adopt_model_fields
from onnx_lowrank.passes.base import Pass, PassResult, Workspace
from onnx_lowrank.rewrite.chain import apply_chain
from onnx_lowrank.rewrite.scoped import prune_initializers, rewrite_in_scopes
from onnx_lowrank.scopes import has_control_flow

__all__ = ["RewritePass", "projected_model", "rewritten_model", "with_model_fields"]

log = logging.getLogger(__name__)


class RewritePass(Pass):
    """Replace each factorized layer by its chain, clean up, record provenance, check the model."""

    name = "rewrite"
    requires = ("chains",)
    provides = ("rewritten",)

    def run(self, workspace, progress):
        if not workspace.rewritten:
            return PassResult(False, "nothing to rewrite")
        if workspace.settings.keep_structure:
            workspace.model = projected_model(workspace)
            summary = f"{len(workspace.rewritten)} layers given low-rank weights, graph kept"
        else:
            workspace.model = rewritten_model(workspace)
            summary = f"{len(workspace.rewritten)} layers replaced by chains"
        if _passes_checker(workspace.original):
            onnx.checker.check_model(without_weights(workspace.model))
        return PassResult(True, summary)


def projected_model(workspace: Workspace) -> onnx.ModelProto:
    """The canonical model with each factorized layer's weight replaced by its chain's kernel.

    Same nodes, same cost: the projection step of low-rank-aware training (Lee et al.,
    DeepTwist). A data-aware bias shift replaces the bias too. New initializers are named after
    the node, so a weight shared with other nodes stays as it is for them.
    """
    model = onnx.ModelProto()
    model.CopyFrom(workspace.canonical)
    nodes = {node.name: (node, graph) for graph, _ in iter_graphs(model.graph) for node in graph.node}
    for decision in workspace.rewritten:
        layer, (node, graph) = decision.layer, nodes[decision.layer.name]
        kernel = chain_kernel(layer, decision.chain).astype(layer.weight.dtype)
        weight_name = f"{layer.name}/lowrank/projected_weight"
        graph.initializer.append(numpy_helper.from_array(kernel, weight_name))
        position = list(node.input).index(layer.weight_name)
        node.input[position] = weight_name
        if decision.chain.bias is not None:
            bias_name = f"{layer.name}/lowrank/projected_bias"
            graph.initializer.append(
                numpy_helper.from_array(decision.chain.bias.astype(layer.weight.dtype), bias_name))
            if len(node.input) > 2:
                node.input[2] = bias_name
            else:
                node.input.append(bias_name)
        decision.macs_after, decision.params_after = layer.macs, layer.params
    prune_initializers(model.graph)
    return with_model_fields(workspace.canonical, model, workspace.settings)


def rewritten_model(workspace: Workspace) -> onnx.ModelProto:
    """The canonical model with every layer whose decision is "rewritten" replaced by its chain
    (in whatever body holds it: `rewrite.scoped`, for models with control flow)."""
    if has_control_flow(workspace.canonical):
        rewritten = rewrite_in_scopes(workspace.canonical, workspace.rewritten)
        return with_model_fields(workspace.canonical, rewritten, workspace.settings)
    graph = gs.import_onnx(workspace.canonical)
    nodes = {node.name: node for node in graph.nodes}
    docs = {}
    for decision in workspace.rewritten:
        built = apply_chain(graph, nodes[decision.layer.name], decision.layer, decision.chain)
        docs.update({node.name: decision.chain.describe(decision.layer) for node in built})
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    rewritten = gs.export_onnx(graph, do_type_check=False)
    for node in rewritten.graph.node:
        if node.name in docs:
            node.doc_string = docs[node.name]
    return with_model_fields(workspace.canonical, rewritten, workspace.settings)


def _passes_checker(model: onnx.ModelProto) -> bool:
    """Whether the ONNX checker accepts `model`; some exporters' output does not pass it.

    Both checks read the model without its large main-graph initializers (typed graph inputs
    instead, `shapes.without_weights`): the checker serialises what it checks, and a copy of the
    weights (twice: bytes, then the checker's own) only to check the graph costs more memory
    than the rest of the run.
    """
    try:
        onnx.checker.check_model(without_weights(model))
    except onnx.checker.ValidationError as exc:
        log.info("the input model does not pass the ONNX checker (%s)", str(exc).splitlines()[0])
        return False
    return True


def with_model_fields(source: onnx.ModelProto, rewritten: onnx.ModelProto,
                       settings: Settings) -> onnx.ModelProto:
    """The rewritten graph with the source's opsets, IR version, producer and metadata, plus provenance.

    The source's fields are set on `rewritten` itself (`model.adopt_model_fields`): neither model's
    weights are copied.
    """
    out = adopt_model_fields(rewritten, source)
    provenance = {"onnx_lowrank.version": __version__,
                  "onnx_lowrank.settings": json.dumps(settings.provenance(), sort_keys=True)}
    kept = [p for p in out.metadata_props if p.key not in provenance]
    del out.metadata_props[:]
    out.metadata_props.extend(kept)
    for key, value in provenance.items():
        out.metadata_props.add(key=key, value=value)
    return out


