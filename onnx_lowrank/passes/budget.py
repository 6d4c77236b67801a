"""The budget pass: ranks (and methods) allocated across layers for a whole-model target."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_lowrank import allocation as alloc
from onnx_lowrank.errors import InputError
from onnx_lowrank.graph import Layer
from onnx_lowrank.methods import MethodSet
from onnx_lowrank.passes.base import Pass, PassResult
from onnx_lowrank.passes.judge import LatencyJudge

__all__ = ["BudgetPass", "TARGET_TOLERANCE"]

#: How far from a --target-macs/--target-params the planned model may land, as a fraction of the
#: whole model's cost.
TARGET_TOLERANCE = 0.02
#: How messages name each budget's measure.
MEASURE_NAMES = {"macs": "MACs", "params": "parameters", "latency": "latency"}
#: Chains timed per layer for --target-latency; the rest of its rank grid is interpolated.
LATENCY_PROBES = 5


class BudgetPass(Pass):
    """Allocate ranks (and, with `--method auto`, methods) across layers for a whole-model target.

    Each candidate layer offers options on a rank grid (multiples of `multiple`): their cost
    (MACs or parameters of the chain, from its template) and their relative squared weight error
    read off the spectra (`Method.error_curve`: Eckart–Young for SVDs, the HOSVD bound for
    Tucker-2), or, with calibration data, their relative squared output error (`DataSpectraPass`)
    times the layer's output gain (`OutputGainsPass`), i.e. the error they cause at the model's
    outputs. `allocation.allocate` picks one option or "dense" per layer so the whole model keeps at
    most `target` of its cost, with the least total error.

    With a latency judge (`--latency-aware`), a MAC or parameter budget is spent only on options
    measured faster than their layer (`_timed`), so rejected chains do not leave the target
    unmet; `--target-latency` spends the measured milliseconds themselves.

    `curves` (``{layer: {method: [(ranks, relative squared error), ...]}}``) replace the curves
    read off the spectra where given: the fit-aware budget's curves measured after a sequential
    fit (`with_curves`, `passes.fit_aware`).
    """

    name = "allocate"
    requires = ("layers",)
    provides = ("ranks",)

    def __init__(self, methods: MethodSet, target: float, measure: str, method_names: Sequence[str],
                 multiple: int = 16, judge: LatencyJudge | None = None, curves: dict | None = None):
        self.methods = methods
        self.target = target
        self.measure = measure
        self.method_names = tuple(method_names)
        self.multiple = multiple
        self.judge = judge
        self.curves = curves or {}

    def with_curves(self, curves: dict) -> BudgetPass:
        """This budget with `curves` in place of the spectra's curves where given."""
        return BudgetPass(self.methods, self.target, self.measure, self.method_names, self.multiple, self.judge,
                          curves)

    def run(self, workspace, progress):
        for decision in workspace.candidates:
            if decision.layer.runs == 0:
                decision.reason = f"kept dense by the budget: in {decision.layer.scope}"
        candidates = workspace.candidates
        options = [self._options(d.layer, workspace, 1.0 if d.output_gain is None else d.output_gain)
                   for d in progress(candidates, len(candidates), "error curves")]
        if self.judge is not None:
            options = [self._timed(d.layer, o) for d, o in
                       zip(candidates, progress(options, len(options), "timing layers"), strict=True)]
        if self.measure == "latency":
            total = sum(o.dense_cost for o in options)  # the compressible layers' own latency
        else:
            total = workspace.totals_before[self.measure]
        fixed = total - sum(o.dense_cost for o in options)
        flag = f"--target-{self.measure}"
        if total <= 0:
            unknown = sum(1 for d in workspace.decisions.values() if d.layer.macs is None)
            raise InputError(f"{flag} {self.target:g}: no {MEASURE_NAMES[self.measure]} to budget: no layer's cost "
                             f"is known ({unknown} layers of unknown shape: pin the input shapes with --input-shape "
                             "NAME:DIMS)")
        allocation = alloc.allocate(options, self.target * total - fixed)
        timed = (" and only chains measured faster than their layers (--latency-aware)"
                 if self.judge is not None and self.measure != "latency" else "")
        if not allocation.feasible:
            lowest = (fixed + allocation.lowest_cost) / total
            raise InputError(f"{flag} {self.target:g} is unreachable with these settings; the lowest "
                             f"reachable is {lowest:.3f} of the model's {MEASURE_NAMES[self.measure]} with ranks "
                             f"in steps of {self.multiple}{timed} (a smaller --rank-multiple reaches lower)")
        if (fixed + allocation.cost) / total < self.target - TARGET_TOLERANCE:
            # The rank grid is coarse: allow the upper half of the band rather than undershoot.
            allocation = alloc.allocate(options, (self.target + TARGET_TOLERANCE) * total - fixed)
        kept = (fixed + allocation.cost) / total
        if abs(kept - self.target) > TARGET_TOLERANCE:
            raise InputError(f"{flag} {self.target:g}: with ranks in steps of {self.multiple}{timed} the closest "
                             f"plan keeps {kept:.3f}, outside ±{TARGET_TOLERANCE:g}; "
                             "try a smaller --rank-multiple")
        for decision in candidates:
            choice = allocation.choices[decision.layer.name]
            if choice is None:
                unit = {"macs": "MAC", "params": "parameter", "latency": "millisecond"}[self.measure]
                decision.reason = f"kept dense by the budget allocator (its error per {unit} saved is the highest)"
            else:
                decision.method, decision.ranks = choice.payload
        return PassResult(True, f"{flag} {self.target:g}: planned {kept:.3f}")

    def _options(self, layer: Layer, workspace, gain: float = 1.0) -> alloc.LayerOptions:
        """The layer's options of every method on the rank grid: cost below the dense layer's,
        error `gain ·` the method's error curve (`self.curves` where given, else read off the data
        spectra when measured, else off the weight's).
        The spectra used are recorded in `workspace.curves` for the report's plots."""
        runs = 1 if self.measure == "params" else layer.runs   # the totals count a layer in a Loop per iteration
        dense = layer.params if self.measure == "params" else layer.macs * runs
        measured = workspace.spectra.get(layer.name, {})
        found: dict[tuple, alloc.Option] = {}
        for method in self.methods.serving_each(self.method_names, layer):
            if method.not_applicable(layer) is not None:
                continue
            spectra = measured.get(method.name) or method.spectra(layer)
            workspace.curves.setdefault(layer.name, {})[method.name] = spectra[0]
            curve = self.curves.get(layer.name, {}).get(method.name) or method.error_curve(layer, spectra,
                                                                                           self.multiple)
            for rank_tuple, error in curve:
                macs, params = method.costs(layer, rank_tuple)
                cost = params if self.measure == "params" else macs * runs
                if cost < dense:
                    found.setdefault((method.name, rank_tuple), alloc.Option(cost, gain * error, (method.name, rank_tuple)))
        return alloc.LayerOptions(layer.name, dense, list(found.values()))

    def _timed(self, layer: Layer, options: alloc.LayerOptions) -> alloc.LayerOptions:
        """The options measured faster than the layer. Per method, the layer and up to
        `LATENCY_PROBES` chains spread over the MAC range are timed (`LatencyJudge`'s profiler),
        the other options' latencies interpolated in MACs between them, and options not faster
        than the original by the judge's margin dropped. For a latency budget their cost becomes
        the milliseconds; other budgets keep their cost."""
        def macs(option: alloc.Option) -> int:
            if self.measure != "params":  # `_options` costed it in MACs already
                return option.cost
            return self.methods[option.payload[0]].costs(layer, option.payload[1])[0]

        by_method: dict[str, list[tuple[int, alloc.Option]]] = {}
        for option in options.options:
            by_method.setdefault(option.payload[0], []).append((macs(option), option))
        in_ms = self.measure == "latency"
        timed, dense = [], None
        for group in by_method.values():
            group.sort(key=lambda pair: pair[0])
            spread = np.linspace(0, len(group) - 1, min(LATENCY_PROBES, len(group)))
            probes = list(dict.fromkeys(round(i) for i in spread))
            chains = [self.methods[group[i][1].payload[0]].template(layer, group[i][1].payload[1]) for i in probes]
            timing = self.judge.profile(layer, chains)
            dense = timing.original.median_ms if dense is None else dense
            measured_macs = np.asarray([layer.macs] + [group[i][0] for i in probes])
            measured_ms = np.asarray([dense] + [stats.median_ms for stats in timing.chains])
            order = np.argsort(measured_macs)
            for option_macs, option in group:
                ms = float(np.interp(option_macs, measured_macs[order], measured_ms[order]))
                if ms < dense * (1 - self.judge.margin):
                    timed.append(alloc.Option(ms if in_ms else option.cost, option.error, option.payload))
        if dense is None and in_ms:  # no option to time: the layer's own latency still counts
            dense = self.judge.profile(layer, []).original.median_ms
        return alloc.LayerOptions(layer.name, dense if in_ms else options.dense_cost, timed)
