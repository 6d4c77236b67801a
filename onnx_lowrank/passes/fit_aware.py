"""The fit-aware budget: ranks allocated on error curves measured after the sequential fit."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np

from onnx_lowrank import calibrate
from onnx_lowrank.graph import Layer
from onnx_lowrank.passes.base import Pass, PassResult
from onnx_lowrank.passes.budget import BudgetPass
from onnx_lowrank.ranks import ModeSpectrum

__all__ = ["FitAwareBudgetPass"]

#: A data-aware fit pass watching its walk: `observe(layer, xs, xts)` -> the pass (`FactorizePass`).
TrialFit = Callable[[Callable[[Layer, list, list], None]], Pass]


class FitAwareBudgetPass(Pass):
    """Allocate the budget, fit once at that plan, and allocate again on the curves the fit saw.

    `BudgetPass` reads each layer's error curve off the ORIGINAL model's statistics: the layer
    seeing the original inputs, fitted in closed form. The sequential fit then sees the inputs of
    the compressed prefix ``p~`` and fits the regression target ``W* = W Sxt Stt⁻¹``, whose
    whitened spectrum under ``Stt`` gives the rank-r fit's error above the floor no rank removes
    (reduced-rank regression): ``E||W p - Ŵ_r p~||² = floor + Σ_{i>r} σ_i(W* L~)²``,
    ``L~ L~ᵀ = Stt``. This pass

    1. runs the budget as it is (the first plan);
    2. runs `trial(observe)`, a sequential fit at the first plan, where `observe` measures each
       budget candidate's spectra of every method on its paired moments (`Method.spectra` with
       the sequential moments: the fit's own curve, at every rank of the grid at once);
    3. gives the decisions back their state before step 1 and runs the budget again with those
       curves (`BudgetPass.with_curves`), each scaled from the tail's share of its own spectrum
       to its share of the original output's energy,
       ``e~(r) = Σ_{i>r} σ_i(W* L~)² / Σ_i σ_i(W L)²``, the unit of the original curves
       (`_energy`); the output gains stay those of the original model.

    A layer without such a curve (no paired statistics, a method that reads no data, a layer the
    walk does not reach) keeps its original curve. Cost: one more sequential fit than the plain
    budget and the spectra of every candidate on paired moments.
    """

    name = "fit-aware allocate"
    requires = ("layers", "calibration", "spectra")
    provides = ("ranks",)

    def __init__(self, budget: BudgetPass, trial: TrialFit):
        self.budget = budget
        self.trial = trial

    def run(self, workspace, progress):
        saved = {name: copy.copy(decision) for name, decision in workspace.decisions.items()}
        wanted = {d.layer.name for d in workspace.candidates}
        self.budget.run(workspace, progress)
        first = _plan(workspace, wanted)
        curves: dict[str, dict[str, list]] = {}

        def observe(layer, xs, xts):
            if layer.name in wanted and layer.name in workspace.spectra:
                curves[layer.name] = self._curves(layer, xs, xts, workspace)

        start = time.perf_counter()
        self.trial(observe).run(workspace, progress)
        trial_s = time.perf_counter() - start
        workspace.decisions = saved
        result = self.budget.with_curves(curves).run(workspace, progress)
        second = _plan(workspace, wanted)
        changed = sum(1 for name in wanted if first[name] != second[name])
        return PassResult(True, f"{result.summary}; re-allocated on the curves of a sequential fit at the first "
                                f"plan ({len(curves)} layers measured, {changed} changed; trial fit {trial_s:.1f} s)")

    def _curves(self, layer: Layer, xs, xts, workspace) -> dict[str, list]:
        """Each measured method's curve of `layer` on its paired moments, in the original's units."""
        original = workspace.spectra[layer.name]
        moments = calibrate.layer_moments(layer, xs, xts, workspace.memory)
        found = {}
        for name in self.budget.method_names:
            method = self.budget.methods.serving(name, layer)
            if method.name not in original or not (moments.dense or method.sample_space):
                continue
            spectra = method.spectra(layer, moments)
            scale = _energy(spectra[0]) / max(_energy(original[method.name][0]), np.finfo(float).tiny)
            found[method.name] = [(ranks, error * scale)
                                  for ranks, error in method.error_curve(layer, spectra, self.budget.multiple)]
        return found


def _energy(spectrum: ModeSpectrum) -> float:
    """``Σ_g Σ_i σ_{g,i}²``: the squared Frobenius norm of the mode's unfolding, groups pooled."""
    return float(sum(np.sum(np.square(values)) for values in spectrum.values))


def _plan(workspace, names) -> dict[str, tuple | None]:
    """The allocated (method, ranks) of each layer named; None for one the budget left dense."""
    decisions = (workspace.decisions[name] for name in names)
    return {d.layer.name: (d.method, d.ranks) if d.reason is None else None for d in decisions}
