"""Passes that measure the original model on calibration inputs for the budget allocator."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from onnx_lowrank import calibrate
from onnx_lowrank.shapes import infer_shapes
from onnx_lowrank.methods import MethodSet
from onnx_lowrank.passes.base import Pass, PassResult
from onnx_lowrank.passes.shared import SharedStatistics, layer_key, statistics_key

__all__ = ["DataSpectraPass", "OutputGainsPass", "gain_samples"]

#: Calibration samples `OutputGainsPass` perturbs: gains are averages, a few samples suffice
#: when the outputs have many independent numbers per sample ...
GAIN_SAMPLES = 8
#: ... otherwise as many as give this many numbers in all (a two-class classifier: 64 samples) ...
GAIN_FREEDOM = 64
#: ... up to this many.
MAX_GAIN_SAMPLES = 64


class DataSpectraPass(Pass):
    """Measure every candidate layer's error-versus-rank in output units on calibration data.

    One walk over the ORIGINAL model (independent statistics) gives each layer's input second
    moments, from which each method serving it reads whitened spectra (`Method.spectra` with
    statistics); the budget allocator then spends the budget where the OUTPUT error per MAC
    saved is smallest, not the weight error.

    The spectra go through a `SharedStatistics` store: the walk visits only the layers the store
    lacks, measuring the methods asked for and the store's `method_names`; each layer's spectra
    of the methods asked for are then read from the store. A private store by default.
    """

    name = "data spectra"
    requires = ("layers", "calibration")
    provides = ("spectra",)

    def __init__(self, methods: MethodSet, method_names: Sequence[str], shared: SharedStatistics | None = None):
        self.methods = methods
        self.method_names = tuple(method_names)
        self.shared = shared if shared is not None else SharedStatistics()

    def _serving(self, layer, names: Sequence[str]) -> list:
        return [m for m in self.methods.serving_each(names, layer)
                if m.uses_data(layer) and m.not_applicable(layer) is None]

    def run(self, workspace, progress):
        stored = self.shared.spectra
        context = statistics_key(workspace.settings)
        view = workspace.view(workspace.calibration)
        layers = {d.layer.name: d.layer for d in workspace.candidates if view.holds(d.layer.subgraph)}
        keys = {name: (context, layer_key(layer)) for name, layer in layers.items()}
        wanted = {name: [m.name for m in self._serving(layer, self.method_names)] for name, layer in layers.items()}
        todo = {name: layer for name, layer in layers.items()
                if keys[name] not in stored or not set(wanted[name]) <= stored[keys[name]].keys()}
        measured = tuple(dict.fromkeys((*self.method_names, *self.shared.method_names)))

        def visit(layer, xs, xts):
            known = stored.get(keys[layer.name], {})
            serving = [m for m in self._serving(layer, measured) if m.name not in known]
            if layer.name in todo and serving:
                moments = calibrate.layer_moments(layer, xs, None, workspace.memory)
                stored[keys[layer.name]] = {**known, **{
                    m.name: m.spectra(layer, moments if moments.dense or m.sample_space else None) for m in serving}}
            return None

        if todo:
            start = time.perf_counter()
            calibrate.walk_layers(view.model, list(todo.values()), workspace.calibration, visit,
                                  sequential=False, progress=progress, activation_limit=workspace.memory.activations)
            self.shared.walks += 1
            self.shared.seconds += time.perf_counter() - start
            for name in todo:   # no method of the layer reads data: nothing to measure, ever
                stored.setdefault(keys[name], {})
        for name in layers:
            if wanted[name]:
                workspace.spectra[name] = {method: stored[keys[name]][method] for method in wanted[name]}
        reused = f", {len(layers) - len(todo)} of them measured before" if len(todo) < len(layers) else ""
        return PassResult(False, f"output-error spectra of {len(workspace.spectra)} layers{reused}")


class OutputGainsPass(Pass):
    """Measure how strongly each candidate layer's output error reaches the model's outputs.

    `calibrate.output_gains` perturbs each layer's output by relative noise (white, or shaped like
    its truncation error: `Settings.gain_noise`) on a few calibration
    batches and measures the relative change of the model's outputs; the budget allocator then
    weighs each layer's error curve by that gain, so layers near a head (or feeding a sensitive
    branch) are cut less than layers whose errors the rest of the model damps.
    """

    name = "output gains"
    requires = ("layers", "calibration")
    provides = ("gains",)

    def __init__(self, shared: SharedStatistics | None = None):
        """`shared`: a store of gains measured before (`passes.shared`); a private one by default."""
        self.shared = shared if shared is not None else SharedStatistics()

    def run(self, workspace, progress):
        view = workspace.view(workspace.calibration)
        todo = [d.layer for d in workspace.candidates if view.holds(d.layer.subgraph)]
        key = (statistics_key(workspace.settings), workspace.settings.gain_noise,
               tuple(layer_key(layer) for layer in todo))
        reused = key in self.shared.gains
        if not reused:
            start = time.perf_counter()
            self.shared.gains[key] = self._measure(workspace, view.model, todo, progress)
            self.shared.gain_runs += 1
            self.shared.seconds += time.perf_counter() - start
        gains, samples = self.shared.gains[key]
        for name, gain in gains.items():
            workspace.decisions[name].output_gain = gain
        spread = f" (from {min(gains.values()):.3g} to {max(gains.values()):.3g})" if gains else ""
        again = ", measured before" if reused else ""
        return PassResult(False, f"output gains of {len(gains)} layers{spread}, on {samples} samples{again}")

    @staticmethod
    def _measure(workspace, model, todo, progress) -> tuple[dict[str, float], int]:
        measured = set(calibrate.measured_outputs(model))
        shapes = workspace.shapes
        if not measured <= shapes.keys():   # e.g. logits behind a Reshape that inference cannot follow
            shapes = infer_shapes(model, workspace.pinned, need=measured, seed=workspace.settings.seed,
                                  values=workspace.values)
        freedom = calibrate.output_freedom(model, shapes)
        feeds, samples = _first_samples(workspace.calibration, gain_samples(freedom))
        gains = calibrate.output_gains(model, todo, feeds, progress=progress,
                                       activation_limit=workspace.memory.activations,
                                       noise=workspace.settings.gain_noise)
        return gains, samples


def gain_samples(freedom: int | None) -> int:
    """Samples to perturb for output gains, given the outputs' independent numbers per sample.

    Each sample's output change is a draw whose squared size has about `freedom` degrees of
    freedom, so a gain's relative spread is about ``sqrt(2 / (samples · freedom))``, at most
    ``sqrt(2 / GAIN_FREEDOM)`` ≈ 18 % below the cap:
    ``samples = clip(ceil(GAIN_FREEDOM / freedom), GAIN_SAMPLES, MAX_GAIN_SAMPLES)``.
    """
    if not freedom:
        return GAIN_SAMPLES
    return min(MAX_GAIN_SAMPLES, max(GAIN_SAMPLES, math.ceil(GAIN_FREEDOM / freedom)))


def _first_samples(feeds: Sequence[dict], samples: int) -> tuple[list[dict], int]:
    """The leading feeds (whole batches) that hold at least `samples` samples on axis 0 (all of
    them when they hold fewer), and how many samples they hold."""
    chosen, count = [], 0
    for feed in feeds:
        if count >= samples:
            break
        chosen.append(feed)
        count += len(next(iter(feed.values())))
    return chosen, count
