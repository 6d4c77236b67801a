"""The points of a sweep and the frontier they span: what was measured of each compressed model,
which of them no other beats on both axes (Pareto), and the fastest that keeps a metric."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from onnx_lowrank.timing import LatencyStats

__all__ = ["QUALITIES", "SweepPoint", "fastest_meeting", "pareto_flags", "quality_of"]

#: The score a frontier reads, best first: the task metric (`--metric`), the top-1 agreement of a
#: classifier's output, else the worst output cosine (every model has one).
QUALITIES = ("metric", "top1_agreement", "cosine")


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: the model compressed for a target with a method, and its numbers.

    Attributes:
        target: the fraction of the whole model's MACs asked for (`Settings.target_macs`).
        method: the `--method` asked for.
        error: why the point has no model (one line: a target out of reach, a bound missed), else None.
        macs / params: MACs and parameters of the compressed model, counted in the model itself.
        macs_kept / params_kept: the same as fractions of the original's.
        layers_rewritten: layers replaced by chains.
        metric / metric_ci95: the task metric on the evaluation inputs and its 95 % interval.
        top1_agreement / top1_ci95: the classifier output's top-1 agreement and its Wilson interval.
        cosine: the worst output cosine against the original; rel_l2: the worst relative L2 error
            (before a final Sigmoid/Softmax where there is one).
        inputs: samples the numbers were measured on; on_fit_inputs: whether they are the
            calibration inputs the fit saw (no `--eval`: optimistic).
        compress_seconds: wall time of the point's `compress` (the shared statistics not included).
        latency: the model's latency from the sweep's one interleaved timing run, or None.
        speedup: the original's median latency over this model's, from the same run.
        pareto: no other point has at least its quality and speed with one of them higher.
        file: the written model's file name in the sweep's folder, or None when not kept.
    """

    target: float
    method: str
    error: str | None = None
    macs: int | None = None
    params: int | None = None
    macs_kept: float | None = None
    params_kept: float | None = None
    layers_rewritten: int | None = None
    metric: float | None = None
    metric_ci95: tuple[float, float] | None = None
    top1_agreement: float | None = None
    top1_ci95: tuple[float, float] | None = None
    cosine: float | None = None
    rel_l2: float | None = None
    inputs: int | None = None
    on_fit_inputs: bool | None = None
    compress_seconds: float | None = None
    latency: LatencyStats | None = None
    speedup: float | None = None
    pareto: bool = False
    file: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the point has a compressed model."""
        return self.error is None

    @property
    def label(self) -> str:
        """How plots and tables name the point: its target and method."""
        return f"{self.target:g} {self.method}"

    @property
    def speed(self) -> float | None:
        """What the frontier's speed axis reads: the measured speed-up, else 1 / MACs kept."""
        if self.speedup is not None:
            return self.speedup
        return None if not self.macs_kept else 1.0 / self.macs_kept

    def to_dict(self) -> dict:
        """The point as sweep.json holds it (intervals as lists, latency as {"median", "p90"})."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for key in ("metric_ci95", "top1_ci95"):
            values[key] = None if values[key] is None else list(values[key])
        values["latency_ms"] = None if self.latency is None else self.latency.to_dict()
        del values["latency"]
        return values


def quality_of(points: Sequence[SweepPoint]) -> str:
    """The first of `QUALITIES` that every point with a model has."""
    made = [p for p in points if p.ok]
    return next((name for name in QUALITIES if made and all(getattr(p, name) is not None for p in made)), "cosine")


def pareto_flags(points: Sequence[SweepPoint], quality: str) -> list[bool]:
    """For each point, whether it is on the frontier of (quality, speed), both higher-is-better.

    A point with a model is on it unless another has at least its quality and at least its speed,
    with one of the two strictly higher; equal points are all on it. Points without a model never are.
    """
    scored = [(getattr(p, quality), p.speed) if p.ok and None not in (getattr(p, quality), p.speed) else None
              for p in points]

    def dominated(mine: tuple[float, float]) -> bool:
        return any(other is not None and other[0] >= mine[0] and other[1] >= mine[1] and other != mine
                   for other in scored)

    return [score is not None and not dominated(score) for score in scored]


def fastest_meeting(points: Sequence[SweepPoint], quality: str, bound: float) -> int | None:
    """The index of the fastest point whose quality is at least `bound` (ties: the higher quality,
    then fewer MACs), or None when none is."""
    meeting = [i for i, p in enumerate(points)
               if p.ok and p.speed is not None and getattr(p, quality) is not None and getattr(p, quality) >= bound]
    if not meeting:
        return None
    return max(meeting, key=lambda i: (points[i].speed, getattr(points[i], quality), -(points[i].macs or 0)))
