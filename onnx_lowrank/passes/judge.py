"""The latency judge of `--latency-aware`: a chain counts only where it is measured faster."""

from __future__ import annotations

from collections.abc import Sequence

from onnx_lowrank.graph import Layer
from onnx_lowrank.passes.base import LayerDecision

__all__ = ["LatencyJudge"]


class LatencyJudge:
    """Keeps a chain only where it is measured faster than the original layer (`--latency-aware`).

    Each layer and its chain are timed alone, interleaved, on the deployment provider with the
    layer's real input shape (`latency.profile_layer`, cached on disk); a chain must beat the
    original's median by `margin` (relative) to count as faster, a guard against timing noise.
    A chain found no faster is timed once more, afresh (a disturbed measurement, perhaps from the
    cache, must not reject it for good), and the second measurement decides.
    """

    def __init__(self, provider: str, threads: int | None = None, margin: float = 0.05,
                 cache=None, timer=None):
        self.provider = provider
        self.threads = threads
        self.margin = margin
        self.cache = cache
        self.timer = timer

    def profile(self, layer: Layer, chains: Sequence, refresh: bool = False):
        """`latency.profile_layer` of the layer and `chains` on this judge's provider, threads,
        cache and timer."""
        from onnx_lowrank import latency

        return latency.profile_layer(layer, chains, provider=self.provider, threads=self.threads, cache=self.cache,
                                     timer=self.timer, refresh=refresh)

    def __call__(self, decision: LayerDecision) -> None:
        """Time a rewritten decision's chain; skip the layer when it is not faster."""
        from onnx_lowrank import latency

        if decision.status != "rewritten":
            return
        for refresh in (False, True):
            timing = self.profile(decision.layer, [decision.chain], refresh=refresh)
            faster = latency.faster_than_original(timing, self.margin)[0]
            if faster:
                break
        decision.latency_ms_before = timing.original.median_ms
        decision.latency_ms_after = timing.chains[0].median_ms
        if not faster:
            decision.status = "skipped"
            decision.reason = (f"measured no faster on {timing.provider}: {timing.chains[0].median_ms:.3f} ms "
                               f"against {timing.original.median_ms:.3f} ms (margin {self.margin:.0%})")
