"""The guard pass: layers rolled back until the requested error bounds hold."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lowrank.intervals import straddles, with_interval
from onnx_lowrank.passes.base import LayerDecision, Pass, PassResult, Workspace
from onnx_lowrank.passes.rewrite import rewritten_model, with_model_fields
from onnx_lowrank.rewrite.chain import apply_chain

__all__ = ["GuardPass", "layer_output_errors"]


def layer_output_errors(workspace: Workspace, feeds: Sequence[dict], provider: str,
                        threads: int | None) -> dict[str, float]:
    """Each rewritten layer's own output error `||y - y'|| / ||y||` on the layer's ORIGINAL inputs.

    One onnxruntime run of the canonical model with every chain attached beside its layer gives
    all of them at once, without the errors of earlier layers mixed in.
    """
    from onnx_lowrank import runtime

    view = workspace.view(feeds)
    graph = gs.import_onnx(view.model)
    nodes = {node.name: node for node in graph.nodes}
    pairs = {}
    for decision in workspace.rewritten:
        if not view.holds(decision.layer.subgraph):
            continue   # no input runs it: no own error to measure
        node = nodes[decision.layer.name]
        built = apply_chain(graph, node, decision.layer, decision.chain, replace=False)
        pairs[decision.layer.name] = (node.outputs[0], built[-1].outputs[0])
        for tensor in pairs[decision.layer.name]:
            tensor.dtype = tensor.dtype or decision.layer.weight.dtype
    if not pairs:
        return {}
    graph.outputs = [tensor for pair in pairs.values() for tensor in pair]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    probe = with_model_fields(view.model, gs.export_onnx(graph, do_type_check=False),
                               workspace.settings)
    session = runtime.make_session(probe, provider, threads, produced=True, label="the layer-error probe")
    residual = dict.fromkeys(pairs, 0.0)
    energy = dict.fromkeys(pairs, 0.0)
    for feed in feeds:
        values = dict(zip((o.name for o in session.get_outputs()), session.run(None, feed)))
        for name, (original, chain) in pairs.items():
            reference = values[original.name].astype(np.float64)
            residual[name] += float(np.sum((reference - values[chain.name]) ** 2))
            energy[name] += float(np.sum(reference ** 2))
    return {name: float(np.sqrt(residual[name] / energy[name])) if energy[name] > 0 else 0.0
            for name in pairs}


class GuardPass(Pass):
    """Roll back layers until the requested error bounds hold.

    The bounds are checked on the calibration inputs (random inputs without them), never on the
    `--eval` inputs, so that the validation on those stays a held-out number.
    `max_error`: every rewritten layer whose own output error (see `layer_output_errors`)
    exceeds it goes back to its original node. `min_cosine` / `min_metric`: end to end, the fewest
    layers with the largest own errors are rolled back (found by bisection) until the worst output
    cosine, or the task metric, reaches the bound.
    """

    name = "guard"
    requires = ("chains", "checks")
    provides = ("rewritten",)

    def __init__(self, provider: str, threads: int | None, max_error: float | None = None,
                 min_cosine: float | None = None, min_metric: float | None = None, metric=None):
        self.provider = provider
        self.threads = threads
        self.max_error = max_error
        self.min_cosine = min_cosine
        self.min_metric = min_metric
        self.metric = metric

    def run(self, workspace, progress):
        if not workspace.rewritten:
            return PassResult(False, "nothing to guard")
        errors = layer_output_errors(workspace, workspace.guard_feeds, self.provider, self.threads)
        for decision in workspace.rewritten:
            decision.output_rel_error = errors.get(decision.layer.name)
        rolled = 0
        if self.max_error is not None:
            for decision in workspace.rewritten:
                if decision.output_rel_error is not None and decision.output_rel_error > self.max_error:
                    decision.roll_back(f"its output error {decision.output_rel_error:.3g} is over "
                                       f"--max-error {self.max_error:g}")
                    rolled += 1
        summary = f"{rolled} layers rolled back"
        if self.min_cosine is not None or self.min_metric is not None:
            count, measured = self._hold_end_to_end(workspace)
            rolled += count
            summary = f"{rolled} layers rolled back; {measured}"
        if rolled:
            workspace.model = rewritten_model(workspace) if workspace.rewritten else workspace.canonical
        return PassResult(rolled > 0, summary)

    def _hold_end_to_end(self, workspace: Workspace) -> tuple[int, str]:
        """Roll back the fewest worst layers for the end-to-end bound; also what the kept model
        measures on the guard's inputs (the metric with its 95 % interval)."""
        worst_first = sorted(workspace.rewritten, key=lambda d: -(d.output_rel_error or 0.0))
        holds, measured = self._holds(workspace, 0, worst_first)
        if holds:
            return 0, measured
        low, high = 1, len(worst_first)
        while low < high:
            middle = (low + high) // 2
            if self._holds(workspace, middle, worst_first)[0]:
                high = middle
            else:
                low = middle + 1
        measured = self._holds(workspace, low, worst_first)[1]
        bound = (f"--min-cosine {self.min_cosine:g}" if self.min_cosine is not None
                 else f"--min-metric {self.min_metric:g}")
        for decision in worst_first[:low]:
            decision.roll_back(f"rolled back to meet {bound} (output error {decision.output_rel_error:.3g}; "
                               f"the model kept: {measured})")
        return low, measured

    def _holds(self, workspace: Workspace, count: int, worst_first: list[LayerDecision]) -> tuple[bool, str]:
        """Whether the bounds hold with the `count` worst layers rolled back, and what was measured."""
        from onnx_lowrank import compare

        kept = worst_first[count:]
        if not kept:
            return True, "every layer rolled back"
        trial = dataclasses.replace(workspace, decisions={d.layer.name: d for d in kept})
        result = compare.compare_models(workspace.original, rewritten_model(trial), workspace.guard_feeds,
                                        provider=self.provider, metric=self.metric, threads=self.threads,
                                        candidate_produced=True, memory_limit=workspace.memory.statistics)
        cosine = min((o.cosine for o in result.outputs), default=1.0)
        measured = f"worst output cosine {cosine:.6f}"
        if self.min_metric is not None:
            measured = f"metric {with_interval(result.metric, result.metric_ci95)} on {result.inputs} samples"
            if straddles(result.metric_ci95, self.min_metric):
                measured += ", an interval that straddles the bound"
        if self.min_cosine is not None and cosine < self.min_cosine:
            return False, measured
        return self.min_metric is None or (result.metric is not None and result.metric >= self.min_metric), measured

