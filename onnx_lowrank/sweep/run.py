"""Running a sweep: per model, the shared statistics once, every point, one timing run.

Per model the inputs are loaded here (where their files are) into a `SharedStatistics`; the
executor gets one task measuring the statistics every point shares (the `default_pipeline`
passes before the budget, filling the store), then one task per point (`compress` with the point's settings, reading that store) and, when asked, the timing run.
With Ray, every model's tasks are submitted before any result is read, so the cluster works on
all of them at once; the results are then collected model by model, timed (on this machine by
default: the one that deploys), placed on the frontier and written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence

from onnx_lowrank.config import Settings
from onnx_lowrank.errors import InputError
from onnx_lowrank.model import load_model
from onnx_lowrank.runtime import provider_name
from onnx_lowrank.sweep import work
from onnx_lowrank.sweep.executors import make_executor
from onnx_lowrank.sweep.options import DEFAULT_METHODS, DEFAULT_TARGETS, SweepModel, SweepOptions, point_settings
from onnx_lowrank.sweep.points import SweepPoint, fastest_meeting, pareto_flags, quality_of
from onnx_lowrank.sweep.result import SweepResult

__all__ = ["sweep", "sweep_models"]

log = logging.getLogger(__name__)

#: Providers whose timing run asks the cluster for a GPU (`--latency-on worker`).
GPU_PROVIDERS = ("cuda", "tensorrt")


def sweep(model, settings: Settings | None = None, targets: Sequence[float] = DEFAULT_TARGETS,
          methods: Sequence[str] = DEFAULT_METHODS, *, output: str | os.PathLike | None = None, keep: str = "pareto",
          min_metric: float | None = None, executor="local", ray_address: str | None = None,
          latency_on: str = "driver", name: str | None = None) -> SweepResult:
    """Compress `model` at every target (fractions of its MACs) with every method and measure each.

    `settings` (inputs, metric, provider, ...) apply to every point; each point is `compress`
    with its method and `target_macs` on top. The calibration walk, data spectra and output
    gains of the original are measured once and shared by all points; all points are timed
    together in one interleaved run against the original. With `output` the folder gets
    sweep.json, sweep.md, pareto.png and the models `keep` names ("best": the fastest point whose
    metric is at least `min_metric`, "pareto", "all"). `executor`: "local", "ray" (joining the
    cluster at `ray_address`, else starting a local one) or an executor object
    (`executors.RayExecutor(cpus=2)`). Returns the frontier as a `SweepResult`.
    """
    options = SweepOptions(tuple(targets), tuple(methods), keep, min_metric, latency_on)
    entry = SweepModel(model, settings or Settings(), name)
    return sweep_models([entry], options, output, executor, ray_address, nested=False)[0]


def sweep_models(models: Sequence[SweepModel], options: SweepOptions, output: str | os.PathLike | None = None,
                 executor="local", ray_address: str | None = None, nested: bool = True) -> list[SweepResult]:
    """`sweep` for several models (the fleet form), all of them in flight at once on a cluster.

    With `output`, each model's files go to `output/<name>/` (`nested`) or to `output` itself (one
    model), and `output/sweep.md` / `sweep.json` list every model when nested.
    """
    from onnx_lowrank.sweep import files

    names = [entry.label for entry in models]
    if len(set(names)) < len(names):
        raise InputError(f"sweep: model names must be unique, got {', '.join(names)}")
    plans = [_plan(entry, options) for entry in models]
    if options.latency_on == "worker" and (executor == "local" or getattr(executor, "name", None) == "local"):
        raise InputError("--latency-on worker times the models on a cluster worker: add --executor ray")
    runner = make_executor(executor, ray_address) if isinstance(executor, str) else executor
    try:
        jobs = [_Job(runner, entry, points, options) for entry, points in zip(models, plans, strict=True)]
        results = []
        for job in jobs:
            folder = None if output is None else (os.path.join(output, job.entry.label) if nested else output)
            results.append(job.finish(folder))
    finally:
        if isinstance(executor, str):
            runner.close()
    if output is not None and nested:
        files.write_index(results, output)
    return results


def _plan(entry: SweepModel, options: SweepOptions) -> list[Settings]:
    """Every point's settings, checked before any work starts."""
    if options.min_metric is not None and entry.settings.metric is None:
        raise InputError(f"{entry.label}: --min-metric needs a task metric: add --metric top1|detection|ctc|textmap|"
                         "module:function")
    return [point_settings(entry.settings, target, method) for method in options.methods for target in options.targets]


class _Job:
    """One model's tasks: submitted when made, collected, timed and written by `finish`."""

    def __init__(self, runner, entry: SweepModel, points: list[Settings], options: SweepOptions):
        self.runner, self.entry, self.points, self.options = runner, entry, points, options
        self.start = time.perf_counter()
        self.original = entry.model if not isinstance(entry.model, str | os.PathLike) else load_model(entry.model)
        self.model = runner.put(self.original)
        inputs = runner.put(work.load_inputs(self.original, points[0], options.measured_methods))
        self.shared = runner.submit(work.measure_statistics, self.model, points[0], inputs)
        self.outcomes = [runner.submit(work.compress_point, self.model, settings, self.shared) for settings in points]

    def finish(self, folder: str | None) -> SweepResult:
        """Collect the points, time them, mark the frontier and the pick, write the files."""
        from onnx_lowrank.sweep import files

        outcomes = self.runner.get(self.outcomes)
        shared = self.runner.get([self.shared])[0]
        timed, timing_seconds = self._time(outcomes, shared)
        points = [_point(outcome, latency, timed) for outcome, latency in
                  zip(outcomes, timed.latencies[1:] if timed else [None] * len(outcomes), strict=True)]
        quality = quality_of(points)
        points = [dataclasses.replace(p, pareto=flag) for p, flag in zip(points, pareto_flags(points, quality), strict=True)]
        picked = None if self.options.min_metric is None else fastest_meeting(points, quality, self.options.min_metric)
        if folder is not None:
            points = files.write_models(points, outcomes, self._kept(points, picked), self.entry.label, folder)
        result = SweepResult(
            self.entry.label, self.entry.source, self.entry.settings, self.options, tuple(points), quality, picked,
            timed.latencies[0] if timed else None, timed.provider if timed else None, timed.device if timed else None,
            {"calibration_walks": shared.walks + sum(o.walks for o in outcomes),
             "output_gain_runs": shared.gain_runs + sum(o.gain_runs for o in outcomes), "seconds": shared.seconds},
            {"points": sum(o.seconds for o in outcomes), "timing": timing_seconds,
             "total": time.perf_counter() - self.start},
            self.runner.name)
        if folder is not None:
            files.write_sweep(result, folder)
        log.info("%s: %d points, %d on the frontier", result.name, len(points), len(result.frontier))
        return result

    def _time(self, outcomes: list[work.PointOutcome], shared) -> tuple[work.Timing | None, float]:
        """The timing run (None when latency is off or no point has a model) and its seconds."""
        settings = self.entry.settings
        if not settings.latency or not any(o.error is None for o in outcomes):
            return None, 0.0
        start = time.perf_counter()
        if self.options.latency_on == "worker":
            gpus = 1 if provider_name(settings.provider) in GPU_PROVIDERS else 0
            task = self.runner.submit(work.time_models, self.model, self.shared, settings, *self.outcomes, gpus=gpus)
            timed = self.runner.get([task])[0]
        else:
            timed = work.time_models(self.original, shared, settings, *outcomes)
        return timed, time.perf_counter() - start

    def _kept(self, points: list[SweepPoint], picked: int | None) -> list[int]:
        """The indexes of the points whose models are written (`--keep`)."""
        if self.options.keep == "all":
            return [i for i, p in enumerate(points) if p.ok]
        if self.options.keep == "pareto":
            return [i for i, p in enumerate(points) if p.pareto]
        return [] if picked is None else [picked]


def _point(outcome: work.PointOutcome, latency, timed) -> SweepPoint:
    """A `SweepPoint` from a point's outcome and its latency in the timing run."""
    if outcome.error is not None:
        return SweepPoint(outcome.target, outcome.method, error=outcome.error, compress_seconds=outcome.seconds)
    before, after = outcome.totals_before, outcome.totals_after
    validation = outcome.validation
    speedup = None if latency is None else timed.latencies[0].median_ms / latency.median_ms
    worst = min(validation["outputs"], key=lambda o: o["cosine"] if o["cosine"] is not None else -1.0, default=None)
    errors = [(o["before_activation"] or o)["rel_l2"] for o in validation["outputs"]]
    return SweepPoint(
        outcome.target, outcome.method, None, after["macs"], after["params"],
        after["macs"] / before["macs"] if before["macs"] else None,
        after["params"] / before["params"] if before["params"] else None, outcome.layers_rewritten,
        validation["metric"], _pair(validation["metric_ci95"]), validation["top1_agreement"],
        _pair(validation["top1_ci95"]), None if worst is None else worst["cosine"],
        None if None in errors or not errors else max(errors), validation["inputs"], validation["on_fit_inputs"],
        outcome.seconds, latency, speedup)


def _pair(values) -> tuple[float, float] | None:
    return None if values is None else (values[0], values[1])
