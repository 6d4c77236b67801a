"""The closing passes: the rewritten model counted from itself, and compared with the original."""

from __future__ import annotations

import dataclasses
from onnx_lowrank.counting import discover
from onnx_lowrank.graph import LAYER_OPS, model_totals
from onnx_lowrank.passes.base import Pass, PassResult

__all__ = ["CountPass", "ValidatePass"]


class CountPass(Pass):
    """Count MACs and parameters of the rewritten model from the model itself, not from the plan."""

    name = "count"
    requires = ("model",)
    provides = ("totals",)

    def run(self, workspace, progress):
        model = workspace.model
        need = {t for n in model.graph.node if n.op_type in LAYER_OPS for t in (*n.input[:2], n.output[0])}
        found = discover(model, workspace.pinned, workspace.values, need, workspace.settings.seed)
        workspace.totals_after = model_totals(found.layers)
        return PassResult(False, "MACs {macs:,}, params {params:,}".format(**workspace.totals_after))


class ValidatePass(Pass):
    """Run the original and the compressed model in onnxruntime and compare (numerics, latency)."""

    name = "validate"
    requires = ("model", "checks")
    provides = ("validation",)

    def __init__(self, provider: str, latency: bool, threads: int | None, metric=None):
        self.provider = provider
        self.latency = latency
        self.threads = threads
        self.metric = metric

    def run(self, workspace, progress):
        from onnx_lowrank import compare, timing as timed

        feeds = workspace.eval_feeds
        result = compare.compare_models(workspace.original, workspace.model, feeds, provider=self.provider,
                                        metric=self.metric, threads=self.threads, candidate_produced=True,
                                        memory_limit=workspace.memory.statistics)
        if self.latency:
            timing = timed.compare_latency(workspace.original, workspace.model, feeds[0], provider=self.provider,
                                           threads=self.threads, candidate_produced=True)
            result = dataclasses.replace(result, latency_before=timing.before,
                                         latency_after=timing.after, speedup=timing.speedup)
        workspace.validation = result
        worst = min((o.cosine for o in result.outputs), default=1.0)
        return PassResult(False, f"{result.provider}: worst output cosine {worst:.6f}")


