"""The outcome of a sweep of one model: its points, the frontier, the pick, and what it cost."""

from __future__ import annotations

import dataclasses

from onnx_lowrank.config import POLICY_KEYS, Settings
from onnx_lowrank.sweep.options import SweepOptions
from onnx_lowrank.sweep.points import SweepPoint
from onnx_lowrank.timing import LatencyStats

__all__ = ["SweepResult"]

#: Settings each point sets for itself.
PER_POINT = frozenset((*POLICY_KEYS, "method"))


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """A model compressed at every target with every method, and the frontier of the results.

    Attributes:
        name: the model's name (files and tables); source: where it came from.
        settings: the settings every point started from; options: the sweep's targets, methods, ...
        points: one `SweepPoint` per method and target, methods outermost, in the order asked.
        quality: which score the frontier reads (`points.QUALITIES`): "metric" with `--metric`,
            else "top1_agreement" for a classifier, else "cosine".
        picked: the index of the fastest point meeting `options.min_metric`, or None.
        original_latency: the original's latency in the timing run (None: not timed).
        provider / device: what the timing run ran on (None: not timed).
        statistics: ``{"calibration_walks", "output_gain_runs", "seconds"}``: the walks over the
            original model and the output-gain runs all points together made, and their time.
        seconds: ``{"points", "timing", "total"}``: the points' compress calls together, the
            timing run, and the whole sweep of this model as this process saw it.
        executor: where the points ran ("local" or "ray").
    """

    name: str
    source: str
    settings: Settings
    options: SweepOptions
    points: tuple[SweepPoint, ...]
    quality: str
    picked: int | None
    original_latency: LatencyStats | None
    provider: str | None
    device: str | None
    statistics: dict
    seconds: dict
    executor: str

    @property
    def frontier(self) -> tuple[SweepPoint, ...]:
        """The Pareto points, fastest first."""
        return tuple(sorted((p for p in self.points if p.pareto), key=lambda p: -p.speed))

    @property
    def best(self) -> SweepPoint | None:
        """The point `--min-metric` picked, or None."""
        return None if self.picked is None else self.points[self.picked]

    def to_dict(self) -> dict:
        """sweep.json: the settings the points share (not the rank policy and method, which are the
        points'), the sweep's options, the pick, the costs and every point."""
        from onnx_lowrank import __version__

        return {
            "tool_version": __version__, "name": self.name, "model": self.source,
            "settings": {k: v for k, v in self.settings.to_dict().items() if k not in PER_POINT},
            "targets": list(self.options.targets), "methods": list(self.options.methods), "keep": self.options.keep,
            "quality": self.quality, "min_metric": self.options.min_metric, "picked": self.picked,
            "provider": self.provider, "device": self.device,
            "latency_ms": None if self.original_latency is None else {"original": self.original_latency.to_dict()},
            "executor": self.executor, "statistics": dict(self.statistics), "seconds": dict(self.seconds),
            "points": [point.to_dict() for point in self.points],
        }

    def figure(self):
        """The Pareto plot (`plot.pareto_figure`): a matplotlib figure, no pyplot involved."""
        from onnx_lowrank.sweep.plot import pareto_figure

        return pareto_figure(self)
