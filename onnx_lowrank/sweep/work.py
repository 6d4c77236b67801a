"""The work of a sweep as functions an executor may run anywhere: load the inputs, measure a
model's shared statistics, compress one point, time the models together.

Each takes and returns plain values (models as `ModelProto`s, `Settings`, the statistics
store); only `load_inputs` reads the user's files, and runs where they are, so the other calls
run in this process or as Ray tasks on other machines, with the same result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import onnx

from onnx_lowrank.api import compress
from onnx_lowrank.config import Settings
from onnx_lowrank.errors import InputError
from onnx_lowrank.passes import BudgetPass, CanonicalizePass, SharedStatistics, Workspace, default_pipeline
from onnx_lowrank.passes.prepare import evaluation_source
from onnx_lowrank.passes.shared import inputs_key
from onnx_lowrank.report import reused_calibration
from onnx_lowrank.runtime import resolve_provider
from onnx_lowrank.timing import LatencyStats, device_name, interleaved_latency

__all__ = ["PointOutcome", "Timing", "compress_point", "load_inputs", "measure_statistics", "time_models"]


@dataclasses.dataclass(frozen=True)
class PointOutcome:
    """What compressing one point gave: the model, or why there is none, and its numbers.

    Attributes:
        target / method: the point.
        error: one line when the point has no model (e.g. a target out of reach), else None.
        model: the compressed model.
        totals_before / totals_after: `{"macs", "params"}` of the original and the compressed model.
        layers_rewritten: layers replaced by chains.
        validation: `ValidationResult.to_dict()` plus ``on_fit_inputs`` (`report.reused_calibration`).
        seconds: wall time of the `compress` call.
        walks / gain_runs: calibration walks and output-gain runs of the ORIGINAL model the point
            made itself because the shared store lacked them (0 when sharing works).
    """

    target: float
    method: str
    error: str | None = None
    model: onnx.ModelProto | None = None
    totals_before: dict | None = None
    totals_after: dict | None = None
    layers_rewritten: int = 0
    validation: dict | None = None
    seconds: float = 0.0
    walks: int = 0
    gain_runs: int = 0


def load_inputs(model: onnx.ModelProto, settings: Settings, method_names: Sequence[str]) -> SharedStatistics:
    """A store for the statistics of the model's points (measuring the data spectra of every
    method in `method_names`), holding the feeds they read, loaded by the pipeline's inputs pass
    where this runs: the machine the paths (or the `module:function`) of `--calib` are on."""
    shared = SharedStatistics(method_names=tuple(method_names))
    _run_before(CanonicalizePass.name, model, settings, shared)
    return shared


def measure_statistics(model: onnx.ModelProto, settings: Settings, shared: SharedStatistics) -> SharedStatistics:
    """`shared` with the model's data spectra and output gains measured: the passes of
    `default_pipeline(settings, shared)` that come before the budget."""
    _run_before(BudgetPass.name, model, settings, shared)
    return shared


def _run_before(name: str, model: onnx.ModelProto, settings: Settings, shared: SharedStatistics) -> None:
    """Run the passes of `default_pipeline(settings, shared)` before the one called `name`."""
    workspace = Workspace(original=model, model=model, settings=settings)
    default_pipeline(settings, shared).before(name).run(workspace)


def compress_point(model: onnx.ModelProto, settings: Settings, shared: SharedStatistics) -> PointOutcome:
    """`compress` the model with `settings` (one point), reading the shared statistics.

    A point whose settings cannot be met (an `InputError` of its own, such as a target out of
    reach of the rank grid) comes back with the error instead of a model.
    """
    pipeline = default_pipeline(settings, shared)
    walks, gain_runs = shared.walks, shared.gain_runs
    start = time.perf_counter()
    try:
        result = compress(model, None, settings, passes=pipeline)
    except InputError as exc:
        return PointOutcome(settings.target_macs, settings.method, error=str(exc), seconds=time.perf_counter() - start,
                            walks=shared.walks - walks, gain_runs=shared.gain_runs - gain_runs)
    validation = None
    if result.validation is not None:
        validation = {**result.validation.to_dict(), "on_fit_inputs": reused_calibration(settings.to_dict())}
    return PointOutcome(settings.target_macs, settings.method, None, result.model, dict(result.totals_before),
                        dict(result.totals_after), len(result.rewritten), validation, time.perf_counter() - start,
                        shared.walks - walks, shared.gain_runs - gain_runs)


@dataclasses.dataclass(frozen=True)
class Timing:
    """The sweep's one timing run.

    Attributes:
        latencies: the original's latency, then each point's (None for a point without a model).
        provider: the onnxruntime provider that ran the sessions; device: what it runs on
            (`timing.device_name`), on the machine that timed.
    """

    latencies: list[LatencyStats | None]
    provider: str
    device: str


def time_models(original: onnx.ModelProto, shared: SharedStatistics, settings: Settings,
                *outcomes: PointOutcome) -> Timing:
    """One interleaved timing run of the original and every point's model
    (`timing.interleaved_latency`) on the first evaluation feed, on the settings' provider."""
    feed = shared.feeds[inputs_key(settings, *evaluation_source(settings))][0]
    provider = resolve_provider(settings.provider, conv_algo_search=settings.cudnn_conv_algo_search)
    made = [o for o in outcomes if o.model is not None]
    labels = ["the original model"] + [f"the model for {o.method} at {o.target:g}" for o in made]
    stats, used = interleaved_latency([original, *(o.model for o in made)], feed, provider, threads=settings.threads,
                                      produced=[False] + [True] * len(made), labels=labels)
    found = iter(stats[1:])
    return Timing([stats[0]] + [next(found) if o.model is not None else None for o in outcomes], used,
                  device_name(used))
