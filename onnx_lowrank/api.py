"""The Python API behind the command line: `inspect`, `compress` and `validate`."""

from __future__ import annotations

import os
import pathlib

import onnx

from onnx_lowrank import inputs
from onnx_lowrank.config import Settings
from onnx_lowrank.errors import InputError
from onnx_lowrank.model import load_model, save_model
from onnx_lowrank.passes import (
    CanonicalizePass, FindLayersPass, PassManager, Tracker, Workspace, compress_pipeline,
    plain_tracker,
)

__all__ = ["compress", "inspect"]


def _as_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def inspect(model: onnx.ModelProto | str | os.PathLike, input_shapes: list[str] | None = None
            ) -> Workspace:
    """List a model's layers with shapes, MACs, parameters and candidate/skip reason.

    Returns the workspace after canonicalization and layer discovery: `.layers` and
    `.totals_before` hold the answer.
    """
    loaded = _as_model(model)
    settings = Settings(input_shape=tuple(input_shapes or ()))
    workspace = Workspace(original=loaded, model=loaded, settings=settings)
    pinned = inputs.parse_input_shapes(settings.input_shape)
    PassManager([CanonicalizePass(), FindLayersPass(pinned)]).run(workspace)
    return workspace


def compress(model: onnx.ModelProto | str | os.PathLike, output: str | os.PathLike | None = None,
             settings: Settings | None = None, tracker: Tracker = plain_tracker) -> Workspace:
    """Factorize the model's layers per `settings`, rewrite them into chains, count, validate.

    When `output` is given the compressed model is saved there atomically; the input file is
    never written. Returns the workspace: `.model`, `.decisions`, `.totals_before/after` and
    `.validation`.
    """
    settings = settings or Settings()
    if output is not None:
        _check_output(model, pathlib.Path(output))
    loaded = _as_model(model)
    pinned = inputs.parse_input_shapes(settings.input_shape)
    checking = settings.validate or settings.guarded
    fitting = settings.calib is not None and settings.data_aware
    calib_feeds = _feeds(loaded, settings, pinned, settings.calib) if fitting or (
        checking and settings.calib and settings.eval is None) else None
    if not checking:
        feeds = None
    elif settings.eval is not None:
        feeds = _feeds(loaded, settings, pinned, settings.eval)
    else:
        feeds = calib_feeds or _feeds(loaded, settings, pinned, None)
    workspace = Workspace(original=loaded, model=loaded, settings=settings)
    manager = PassManager(compress_pipeline(settings, pinned, feeds, calib_feeds), tracker)
    manager.run(workspace)
    workspace.timings = manager.timings
    if output is not None:
        save_model(workspace.model, output)
    return workspace


def _check_output(model, output: pathlib.Path) -> None:
    if not isinstance(model, onnx.ModelProto) and output.resolve() == pathlib.Path(model).resolve():
        raise InputError(f"{output}: refusing to overwrite the input model; choose another -o")
    folder = output.parent if str(output.parent) else pathlib.Path(".")
    if not folder.is_dir():
        raise InputError(f"{output}: the output folder {folder} does not exist")


def _feeds(model: onnx.ModelProto, settings: Settings, pinned, path: str | None) -> list[dict]:
    """Inputs from an .npz or image folder at `path`, else random inputs with the settings' seed."""
    specs = inputs.input_specs(model)
    if path is not None:
        return inputs.load_calibration(path, specs, shapes=pinned, count=settings.calib_count,
                                       batch_size=settings.batch_size,
                                       image_options=settings.image_options())
    shapes = inputs.resolve_shapes(specs, pinned)
    return inputs.random_feeds(specs, shapes, count=settings.calib_count, seed=settings.seed)
