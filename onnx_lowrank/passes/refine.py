"""The refine pass: block-wise reconstruction of the fitted chains (`refine.optimize`).

Block boundaries are the model's *single-tensor cuts*: positions in the topological node order
where exactly one computed tensor is alive (produced before, read after), such as the input and
output of a residual block or any tensor of a plain chain. Between consecutive cuts the model is
cut into intervals; consecutive intervals are joined into blocks of at most `MAX_LAYERS`
rewritten layers (a block starts at its first rewritten layer's interval). Each block therefore
reads one tensor and writes one.

One walk over the calibration inputs carries two worlds, as the sequential fit does: the original
model, and the model compressed so far (with the blocks already refined). At each block the
compressed block (its layers replaced by their chains) is run in numpy from the compressed
world's input and refined to match the ORIGINAL block's output; the refined chains then carry
the compressed world on. A block holding a node without a numpy gradient (`refine.ops`) is
passed through unrefined, with its reason logged.

The walk runs on the calibration view (`Workspace.view`: the If branches the calibration inputs
take inlined), as the sequential fit does, and liveness counts the outer-scope names read inside
bodies. Only main-graph layers are refined: the layers of bodies, inlined branches included,
keep their closed-form fit, and a block holding a Loop, Scan or undecided If is passed through.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_lowrank.activations import ActivationBudget
from onnx_lowrank.calibrate import _dtypes, _inputs, _referenced, _run, _Segments
from onnx_lowrank.passes.base import LayerDecision, Pass, PassResult
from onnx_lowrank.refine.block import Block
from onnx_lowrank.refine.optimize import RefineOptions, refine_block
from onnx_lowrank.rewrite.chain import Chain, ShuffleStage, apply_chain

__all__ = ["MAX_LAYERS", "RefinePass", "block_ranges", "single_tensor_cuts"]

log = logging.getLogger(__name__)

#: Rewritten layers refined together in one block, at most.
MAX_LAYERS = 3


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers and the tensors computed from them alone (an exporter's casts of constants)."""
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if all(not name or name in constants for name in node.input):
            constants.update(node.output)
    return constants


def single_tensor_cuts(model: onnx.ModelProto) -> list[int]:
    """Positions p (cut before node p) where exactly one tensor computed from the graph inputs (or
    a graph input) is alive; tensors computed from constants alone do not count (`constant_tensors`).
    A node reads the outer-scope names its bodies read too."""
    nodes = model.graph.node
    constants = constant_tensors(model)
    last_use: dict[str, int] = {name: len(nodes) for name in (o.name for o in model.graph.output)}
    first: dict[str, int] = {i.name: 0 for i in model.graph.input if i.name not in constants}
    for position, node in enumerate(nodes):
        for name in _referenced(node):
            if name not in constants:
                last_use[name] = max(last_use.get(name, position), position)
        for name in node.output:
            if name not in constants:
                first[name] = position + 1
    alive = np.zeros(len(nodes) + 1, dtype=int)
    for name, born in first.items():
        end = last_use.get(name, born - 1)
        if end >= born:
            alive[born:end + 1] += 1
    return [p for p in range(len(nodes) + 1) if alive[p] == 1]


def block_ranges(cuts: list[int], layer_positions: list[int], max_layers: int = MAX_LAYERS) -> list[tuple[int, int]]:
    """``[start, stop)`` node ranges of the blocks: intervals between consecutive cuts joined while
    they hold at most `max_layers` layers (an interval holding more is a block of its own). A
    block starts with an interval holding a layer and takes the one interval after its last layer
    when that holds none (the activation after it, so that the block's output is what the next
    layer reads); other layerless intervals outside blocks are left out."""
    intervals = list(zip(cuts, cuts[1:]))
    counts = [sum(low <= p < high for p in layer_positions) for low, high in intervals]
    blocks, index = [], 0
    while index < len(intervals):
        if not counts[index]:
            index += 1
            continue
        first = last = index
        total, following = counts[index], index + 1
        while following < len(intervals) and total + counts[following] <= max_layers:
            total += counts[following]
            last = following if counts[following] else last
            following += 1
        end = last + 1 if last + 1 < len(intervals) and not counts[last + 1] else last
        blocks.append((intervals[first][0], intervals[end][1]))
        index = end + 1
    return blocks


class RefinePass(Pass):
    """Refine the chains block by block to the original blocks' outputs (see the module docstring)."""

    name = "refine"
    requires = ("chains", "calibration")
    provides = ("chains",)

    def __init__(self, options: RefineOptions = RefineOptions()):
        self.options = options

    def run(self, workspace, progress):
        decisions = {d.layer.name: d for d in workspace.rewritten
                     if d.layer.subgraph is None and isinstance(d.chain, Chain)}
        if not decisions:
            return PassResult(False, "no chain to refine")
        model = workspace.view(workspace.calibration).model
        constants = constant_tensors(model)
        segments = _Segments(model)
        positions = {node.name: p for p, node in enumerate(segments.nodes)}
        blocks = block_ranges(single_tensor_cuts(model), sorted(positions[name] for name in decisions))
        original = _inputs(workspace.calibration)
        compressed = dict(original)
        budget = ActivationBudget(workspace.memory.activations)
        refined, before, after, start = 0, [], [], 0
        try:
            for low, high in progress(blocks, len(blocks), "refining blocks"):
                _advance(segments, start, low, original, compressed, decisions, budget)
                built = segments.build(low, high, _dtypes(compressed))
                block_model = _with_chains(built[0], decisions)
                block = Block.from_model(block_model)
                fixed = [name for name in block.inputs if name in constants]
                block.constants.update({name: np.asarray(compressed[name][0]) for name in fixed})
                block.inputs = [name for name in block.inputs if name not in constants]
                reason = block.unsupported()
                inside = [d for name, d in decisions.items() if low <= positions[name] < high]
                if reason is None and inside:
                    targets = _outputs_of(segments, low, high, original, budget)
                    result = refine_block(block, _params(inside), _stacked(compressed, block.inputs),
                                          _stacked(targets, block.outputs), self.options)
                    if result.improved:
                        _store(inside, result.params)
                        refined += 1
                    before.append(result.held_out_before)
                    after.append(result.held_out_after)
                    log.info("block of %s: held-out error %.4g -> %.4g in %d steps", [d.layer.name for d in inside],
                             result.held_out_before, result.held_out_after, result.steps)
                else:
                    log.info("block of %s left as fitted: %s", [d.layer.name for d in inside], reason)
                _advance(segments, low, high, original, compressed, decisions, budget)
                start = high
        finally:
            budget.close()
        summary = f"{refined} of {len(blocks)} blocks refined"
        if before:
            summary += f" (held-out block error, mean {np.mean(before):.3g} -> {np.mean(after):.3g})"
        return PassResult(refined > 0, summary)


def _advance(segments: _Segments, start: int, stop: int, original: dict, compressed: dict,
             decisions: dict[str, LayerDecision], budget: ActivationBudget) -> None:
    """Run nodes[start:stop] in both worlds: as they are, and with the chains in place."""
    for state, chained in ((original, False), (compressed, True)):
        built = segments.build(start, stop, _dtypes(state))
        if built is not None:
            model = _with_chains(built[0], decisions) if chained else built[0]
            _run(model, built[1], state, "cpu", budget)
        segments.forget(state, stop - 1)


def _outputs_of(segments: _Segments, start: int, stop: int, state: dict, budget: ActivationBudget) -> dict:
    """The outputs of nodes[start:stop] of the original model, without changing `state`."""
    copy = dict(state)
    built = segments.build(start, stop, _dtypes(copy))
    _run(*built, copy, "cpu", budget)
    return {name: copy[name] for name in built[1]}


def _with_chains(model: onnx.ModelProto, decisions: dict[str, LayerDecision]) -> onnx.ModelProto:
    """`model` (a segment of the canonical model) with its rewritten layers replaced by their chains."""
    graph = gs.import_onnx(model)
    for node in list(graph.nodes):
        if node.name in decisions:
            decision = decisions[node.name]
            apply_chain(graph, node, decision.layer, decision.chain)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    exported = gs.export_onnx(graph, do_type_check=False)
    exported.ir_version = model.ir_version
    return exported


def _stacked(state: dict, names: list[str]) -> dict[str, np.ndarray]:
    """Each named tensor's calibration batches as one array."""
    return {name: np.concatenate([np.asarray(batch) for batch in state[name]]) for name in names}


def _weight_names(decision: LayerDecision) -> list[tuple[int, str]]:
    """(stage index, initializer name) of each weighted stage, as `apply_chain` names them."""
    return [(index, f"{decision.layer.name}/lowrank/{index}_weight")
            for index, stage in enumerate(decision.chain.stages) if not isinstance(stage, ShuffleStage)]


def _params(decisions: list[LayerDecision]) -> dict[str, np.ndarray]:
    """The trainable constants of the chains: every stage weight, and the bias each chain sets."""
    params = {}
    for decision in decisions:
        for index, name in _weight_names(decision):
            params[name] = decision.chain.stages[index].weight
        if decision.chain.bias is not None:
            params[f"{decision.layer.name}/lowrank/bias"] = decision.chain.bias
    return params


def _store(decisions: list[LayerDecision], params: dict[str, np.ndarray]) -> None:
    """Write refined constants back into the decisions' chains."""
    for decision in decisions:
        stages = list(decision.chain.stages)
        for index, name in _weight_names(decision):
            stages[index] = dataclasses.replace(stages[index], weight=params[name].astype(stages[index].weight.dtype))
        bias_name = f"{decision.layer.name}/lowrank/bias"
        bias = params[bias_name] if bias_name in params else decision.chain.bias
        decision.chain = dataclasses.replace(decision.chain, stages=tuple(stages), bias=bias)
