"""The passes that prepare a model for factorization: inputs, canonical form, folds, layers."""

from __future__ import annotations

import re

import numpy as np

from onnx_lowrank import inputs
from onnx_lowrank.augment import augmented
from onnx_lowrank.errors import InputError
from onnx_lowrank.fold import fold_elementwise
from onnx_lowrank.counting import discover
from onnx_lowrank.graph import LAYER_OPS, canonicalize, model_totals
from onnx_lowrank.passes.base import LayerDecision, Pass, PassResult
from onnx_lowrank.passes.shared import SharedStatistics, inputs_key
from onnx_lowrank.pins import with_values, without_pinned

__all__ = ["CanonicalizePass", "FindLayersPass", "FoldPass", "LoadInputsPass", "SelectLayersPass", "NO_INPUTS",
           "calibration_source", "evaluation_source"]


#: Calibration inputs used at most when --calib-count is not given (docs/bench_calib_count.md: on
#: the four measured models the fit stops improving at 64 inputs, the recogniser gets worse past it,
#: and the time keeps growing with the count).
CALIB_CAP = 64
#: The inputs pass's summary when the run loads none (no calibration, guard or validation).
NO_INPUTS = "no inputs needed"
class LoadInputsPass(Pass):
    """Load the feeds each later step reads, once each.

    Calibration (`--calib`, at most `--calib-count`, default `CALIB_CAP`) feeds the data-aware
    fit, followed by `--augment` transformed copies of its images (`augment.augmented`); the guard checks its bounds on the calibration inputs too (`RANDOM_COUNT` random inputs
    without them: `inputs.RANDOM_COUNT`, or --calib-count), never on the evaluation inputs; the validation scores `--eval` when given
    (all of it, or `--eval-count`: a held-out number), else the calibration inputs, else random
    inputs (`--seed`).
    """

    name = "inputs"
    requires = ("model",)
    provides = ("calibration", "checks")

    def __init__(self, shared: SharedStatistics | None = None):
        """`shared`: a store of feeds loaded before (`passes.shared`); a private one by default."""
        self.shared = shared if shared is not None else SharedStatistics()

    def run(self, workspace, progress):
        settings = workspace.settings
        loaded: dict[tuple, list[dict]] = {}

        def feeds(path: str | None, count: int | None) -> list[dict]:
            key = inputs_key(settings, path, count)
            if key not in self.shared.feeds:
                self.shared.feeds[key] = _load(workspace.original, settings, workspace.pinned, workspace.values,
                                               path, count)
            loaded[path, count] = self.shared.feeds[key]
            return loaded[path, count]

        if settings.calib is not None and settings.data_aware:
            workspace.calibration = augmented(feeds(*calibration_source(settings)), settings.augment, settings.seed)
        if settings.guarded:
            workspace.guard_feeds = feeds(*calibration_source(settings))
        if settings.validate:
            workspace.eval_feeds = feeds(*evaluation_source(settings))
        return PassResult(False, ", ".join(_described(settings, path, count, f)
                                           for (path, count), f in loaded.items()) or NO_INPUTS)


def calibration_source(settings) -> tuple[str | None, int | None]:
    """(path, count) of the calibration inputs: `--calib`, at most `--calib-count` (default
    `CALIB_CAP`); random inputs (`--calib-count` of them, if given) without `--calib`."""
    return settings.calib, settings.calib_count or (CALIB_CAP if settings.calib is not None else None)


def evaluation_source(settings) -> tuple[str | None, int | None]:
    """(path, count) of the validation inputs: `--eval` (at most `--eval-count`), else the
    calibration inputs (`calibration_source`)."""
    return (settings.eval, settings.eval_count) if settings.eval is not None else calibration_source(settings)


def _described(settings, path: str | None, count: int | None, feeds: list[dict]) -> str:
    """"N samples from PATH", saying when the default cap (`CALIB_CAP`) cut the calibration set."""
    text = f"{_samples(feeds)} samples from {path or 'random inputs'}"
    capped = (path is not None and settings.calib_count is None and (path, count) == (settings.calib, CALIB_CAP)
              and _samples(feeds) == CALIB_CAP)
    return text + (" (the default cap; --calib-count N for more)" if capped else "")


def _samples(feeds: list[dict]) -> int:
    return sum(next((len(v) for v in feed.values() if np.ndim(v) >= 1), 1) for feed in feeds)


def _load(model, settings, pinned, values, path: str | None, count: int | None) -> list[dict]:
    """At most `count` samples from the inputs at `path` (`inputs.load_calibration`), else
    `count` (default `inputs.RANDOM_COUNT`) random inputs with the settings' seed; the inputs
    pinned by --input-value take their values (`pins.with_values`)."""
    specs = inputs.input_specs(model)
    free = without_pinned(specs, values)
    if path is not None:
        feeds = inputs.load_calibration(path, free, shapes=pinned, count=count,
                                        batch_size=settings.batch_size, image_options=settings.image_options())
    else:
        shapes = inputs.resolve_shapes(free, pinned)
        feeds = inputs.random_feeds(free, shapes, count=count or inputs.RANDOM_COUNT, seed=settings.seed)
    return with_values(feeds, values, specs)


class CanonicalizePass(Pass):
    """Constant weights -> initializers, auto_pad -> explicit pads, every node named.

    A model the run loaded itself (`Workspace.owned`) is made canonical in place: the original
    and the canonical model are then one object (the same function, the same weights), not two
    copies of the weights.
    """

    name = "canonicalize"
    requires = ("model",)
    provides = ("canonical",)

    def run(self, workspace, progress):
        workspace.model = workspace.canonical = canonicalize(workspace.model, copy=not workspace.owned)
        return PassResult(True, "weights as initializers, explicit pads, named nodes")


class FoldPass(Pass):
    """Fold per-channel affine nodes into the convolutions beside them and fuse hard-swish
    chains (`fold.fold_elementwise`): exact, and fewer passes over the activations."""

    name = "fold"
    requires = ("canonical",)
    provides = ("canonical",)

    def run(self, workspace, progress):
        workspace.model, workspace.folds = fold_elementwise(workspace.canonical)
        workspace.canonical = workspace.model
        return PassResult(workspace.folds.total > 0, workspace.folds.describe())


class FindLayersPass(Pass):
    """Infer shapes (pinned by --input-shape, values by --input-value) and list every layer with
    its cost, in every control-flow body (`counting.discover`)."""

    name = "find layers"
    requires = ("canonical",)
    provides = ("layers",)

    def run(self, workspace, progress):
        model = workspace.canonical
        need = {t for n in model.graph.node if n.op_type in LAYER_OPS
                for t in (*n.input[:1], *n.input[1:2], n.output[0])}
        found = discover(model, workspace.pinned, workspace.values, need, workspace.settings.seed)
        workspace.shapes, workspace.layers, workspace.counting = found.shapes, found.layers, found.counting
        workspace.totals_before = model_totals(workspace.layers)
        workspace.decisions = {layer.name: LayerDecision(layer, reason=layer.skip_reason)
                               for layer in workspace.layers}
        candidates = sum(layer.candidate for layer in workspace.layers)
        return PassResult(False, f"{len(workspace.layers)} layers, {candidates} candidates")


class SelectLayersPass(Pass):
    """Keep the candidates whose name matches `--layers` and not `--skip` (regular expressions)."""

    name = "select layers"
    requires = ("layers",)

    def __init__(self, include: str | None, exclude: str | None):
        self.include = _compile(include, "--layers")
        self.exclude = _compile(exclude, "--skip")

    def run(self, workspace, progress):
        dropped = 0
        for decision in workspace.candidates:
            name = decision.layer.name
            if self.include is not None and not self.include.search(name):
                decision.reason = "not selected by --layers"
            elif self.exclude is not None and self.exclude.search(name):
                decision.reason = "excluded by --skip"
            else:
                continue
            dropped += 1
        return PassResult(dropped > 0, f"{dropped} candidates left out by --layers/--skip")


def _compile(pattern: str | None, flag: str):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InputError(f"{flag}: not a valid regular expression '{pattern}' ({exc})") from None
