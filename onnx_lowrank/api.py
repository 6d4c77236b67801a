"""The Python API behind the command line: `inspect`, `compress` and `project`.

`compress` runs a `Pipeline` of passes (the default one for its `Settings`, or one the caller
built: `default_pipeline(settings).insert_after("fold", MyPass())`) over a `Workspace` and
returns a frozen `CompressionResult`: the model, the per-layer decisions, the totals, the
validation and the timings of the passes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

import numpy as np
import onnx

from onnx_lowrank.config import Settings
from onnx_lowrank.errors import BoundError, InputError
from onnx_lowrank.fold import FoldCounts
from onnx_lowrank.model import load_model, save_model
from onnx_lowrank.passes import LayerResult, PassTiming, Pipeline, Tracker, Workspace, default_pipeline, plain_tracker
from onnx_lowrank.passes.pipeline import inspect_pipeline
from onnx_lowrank.report import compression_report, report_curves, write_report

__all__ = ["CompressionResult", "InspectResult", "LayerResult", "WEIGHT_ONLY_WARNING", "compress", "inspect", "project"]

log = logging.getLogger(__name__)

#: What `compress` says, once, when it fits weights only because no calibration inputs were given.
WEIGHT_ONLY_WARNING = ("no --calib: fitting the weights only, which on detectors and recognisers usually costs "
                       "much task accuracy (0 % of a recogniser's strings at 1.5x fewer MACs); pass a few hundred "
                       "representative inputs with --calib (an .npz, a folder of images or .npy files, or "
                       "module:function), or --no-data-aware to silence this")


@dataclasses.dataclass(frozen=True)
class CompressionResult:
    """The outcome of `compress`.

    Attributes:
        model: the compressed model (also saved at `output` when one was given).
        settings: the settings it was made with.
        layers: one `LayerResult` per Conv/ConvTranspose/Gemm/MatMul layer, in graph order.
        totals_before / totals_after: `{"macs", "params"}` of the whole model before and after
            (after: counted from the written model itself).
        folds: the exact folds done before factorizing.
        validation: the comparison with the original (`validate.ValidationResult`), or None.
        timings: each pass's name, seconds and result, in order.
        curves: the spectra and error curves of the largest factorized layers, those the ranks
            were chosen from (`report.report_curves`), when a report was asked for; else None.
        counting: how the totals count If branches and Loop/Scan iterations, in words (None
            without control flow).
    """

    model: onnx.ModelProto
    settings: Settings
    layers: tuple[LayerResult, ...]
    totals_before: dict
    totals_after: dict
    folds: FoldCounts
    validation: object | None
    timings: tuple[PassTiming, ...]
    curves: object | None = None
    counting: str | None = None

    @property
    def rewritten(self) -> tuple[LayerResult, ...]:
        """The layers replaced by chains."""
        return tuple(layer for layer in self.layers if layer.status == "rewritten")


@dataclasses.dataclass(frozen=True)
class InspectResult:
    """The outcome of `inspect`: every layer (`graph.Layer`) and the model's totals."""

    layers: tuple
    totals: dict
    counting: str | None = None


def _as_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def inspect(model: onnx.ModelProto | str | os.PathLike, input_shapes: list[str] | None = None,
            input_values: list[str] | None = None) -> InspectResult:
    """List a model's layers with shapes, MACs, parameters and candidate/skip reason; `counting`
    says how the totals count control flow (None without it)."""
    loaded = _as_model(model)
    settings = Settings(input_shape=tuple(input_shapes or ()), input_value=tuple(input_values or ()))
    workspace = Workspace(original=loaded, model=loaded, settings=settings)
    inspect_pipeline().run(workspace)
    return InspectResult(tuple(workspace.layers), dict(workspace.totals_before), workspace.counting)


def compress(model: onnx.ModelProto | str | os.PathLike, output: str | os.PathLike | None = None,
             settings: Settings | None = None, passes: Pipeline | None = None,
             tracker: Tracker = plain_tracker) -> CompressionResult:
    """Factorize the model's layers per `settings`, rewrite them into chains, count, validate.

    `passes`: the pipeline to run (default: `default_pipeline(settings)`). When `output` is
    given the compressed model is saved there atomically; the input file is never written.
    With `settings.report` the report (JSON, Markdown, plots) is written to that folder; with
    `settings.require_speedup` a model not measured faster end to end raises `BoundError`.
    """
    settings = settings or Settings()
    if output is not None:
        _check_output(model, pathlib.Path(output))
    loaded = _as_model(model)
    if settings.calib is None and settings.data_aware and not settings.keep_structure:
        log.warning(WEIGHT_ONLY_WARNING)
    pipeline = passes if passes is not None else default_pipeline(settings)
    workspace = Workspace(original=loaded, model=loaded, settings=settings, owned=loaded is not model)
    timings = pipeline.run(workspace, tracker)
    result = CompressionResult(
        model=workspace.model, settings=settings,
        layers=tuple(d.result() for d in workspace.decisions.values()),
        totals_before=dict(workspace.totals_before), totals_after=dict(workspace.totals_after),
        folds=workspace.folds, validation=workspace.validation, timings=tuple(timings),
        curves=report_curves(workspace) if settings.report is not None else None, counting=workspace.counting)
    if output is not None:
        save_model(result.model, output)
    if settings.report is not None:
        write_report(compression_report(result, _name(model), _name(output)), settings.report, result.curves)
    if settings.require_speedup:
        _check_speedup(result)
    return result


def _name(path) -> str:
    return "<in memory>" if path is None or isinstance(path, onnx.ModelProto) else str(path)


def _check_speedup(result: CompressionResult) -> None:
    speedup = getattr(result.validation, "speedup", None)
    if speedup is None:
        raise BoundError("--require-speedup: no end-to-end latency was measured (drop --no-latency/--no-validate)",
                         result)
    if speedup <= 1.0:
        raise BoundError(f"--require-speedup: the compressed model is not faster end to end "
                         f"(x{speedup:.2f} on {result.validation.provider})", result)


def _check_output(model, output: pathlib.Path) -> None:
    if not isinstance(model, onnx.ModelProto) and output.resolve() == pathlib.Path(model).resolve():
        raise InputError(f"{output}: refusing to overwrite the input model; choose another -o")
    folder = output.parent if str(output.parent) else pathlib.Path(".")
    if not folder.is_dir():
        raise InputError(f"{output}: the output folder {folder} does not exist")


def project(weight: np.ndarray, method: str, rank: int | tuple[int, int], groups: int = 1,
            tiles: tuple[int, int] = (2, 2), seed: int = 0) -> np.ndarray:
    """`W -> Ŵ`, the reconstruction of `method`'s rank-`rank` factorization, same shape and dtype.

    The weight-distortion step of low-rank-aware training (Lee et al., DeepTwist): a training
    loop in any framework calls it on its weights every few steps. A 2-D weight is a matrix
    (truncated SVD, `Ŵ = U_r Σ_r V_rᵀ`, whatever the method); a conv kernel `[T, S/g, k..]` takes
    any method (`Method.project`): "tucker2" takes an int for both modes or `(Rt, Rs)`,
    "tiled-svd" its `tiles`, CP its `seed`.
    """
    from onnx_lowrank.factorize import truncated_svd
    from onnx_lowrank.methods import MethodSet

    weight = np.asarray(weight)
    if weight.ndim == 2:
        return truncated_svd(weight, int(rank)).to_tensor().astype(weight.dtype)
    chosen = MethodSet(Settings(method=method, tiles=tuple(tiles), seed=seed))[method]
    return chosen.project(weight, rank, groups).astype(weight.dtype)
