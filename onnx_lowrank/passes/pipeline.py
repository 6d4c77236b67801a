"""The default compression pipeline for a set of `Settings`."""

from __future__ import annotations

from onnx_lowrank import ranks
from onnx_lowrank.config import Settings
from onnx_lowrank.methods import MethodSet, auto_candidates
from onnx_lowrank.metrics import load_metric
from onnx_lowrank.passes.base import Pass, Pipeline
from onnx_lowrank.passes.budget import BudgetPass
from onnx_lowrank.passes.factorize import FactorizePass
from onnx_lowrank.passes.finish import CountPass, ValidatePass
from onnx_lowrank.passes.fit_aware import FitAwareBudgetPass
from onnx_lowrank.passes.guard import GuardPass
from onnx_lowrank.passes.judge import LatencyJudge
from onnx_lowrank.passes.refine import RefinePass
from onnx_lowrank.passes.prepare import (
    CanonicalizePass, FindLayersPass, FoldPass, LoadInputsPass, SelectLayersPass,
)
from onnx_lowrank.passes.rewrite import RewritePass
from onnx_lowrank.passes.shared import SharedStatistics
from onnx_lowrank.passes.statistics import DataSpectraPass, OutputGainsPass
from onnx_lowrank.runtime import resolve_provider

__all__ = ["default_pipeline", "inspect_pipeline", "rank_policy"]


def rank_policy(settings: Settings):
    """The per-layer rank policy of the settings (budgets plan ranks in `BudgetPass` instead)."""
    if settings.rank is not None:
        return ranks.FixedRank(settings.rank)
    if settings.energy is not None:
        return ranks.Snapped(ranks.Energy(settings.energy), settings.rank_multiple)
    if settings.vbmf:
        return ranks.Snapped(ranks.VBMF(), settings.rank_multiple)
    return ranks.RankRatio(settings.rank_ratio or 1.0)


def inspect_pipeline() -> Pipeline:
    """The passes of `inspect`: canonical form and the layers with their costs."""
    return Pipeline((CanonicalizePass(), FindLayersPass()))


def default_pipeline(settings: Settings, shared: SharedStatistics | None = None) -> Pipeline:
    """The passes `compress` runs for `settings`, in order.

    inputs -> canonicalize -> [fold] -> find layers -> select layers -> [data spectra, output
    gains: with a budget and calibration data] -> [allocate: with a budget; fit-aware allocate
    with --fit-aware-budget and calibration data] -> factorize ->
    [refine: --refine-blocks with calibration data] -> rewrite -> [guard: with a bound] -> count ->
    [validate]. `shared`: the store of inputs, data spectra and gains that runs over the same model
    share (`passes.shared.SharedStatistics`); a private one by default.
    """
    shared = shared if shared is not None else SharedStatistics()
    methods = MethodSet(settings)
    provider = resolve_provider(settings.provider, conv_algo_search=settings.cudnn_conv_algo_search)
    data_aware = settings.calib is not None and settings.data_aware
    judge = None
    if settings.latency_aware or settings.target_latency is not None:
        from onnx_lowrank.latency import LatencyCache

        judge = LatencyJudge(provider, settings.threads, settings.latency_margin, LatencyCache())
    metric = load_metric(settings.metric) if settings.metric else None

    def factorize(judge: LatencyJudge | None, observe=None) -> FactorizePass:
        """The fit; the fit-aware budget's trial fit is one more, watched, without the judge."""
        return FactorizePass(methods, settings.method, rank_policy(settings), data_aware=data_aware,
                             sequential=settings.sequential, refit=settings.refit,
                             bias_correction=settings.bias_correction, jobs=settings.jobs, judge=judge,
                             activation_aware=settings.activation_aware, observe=observe)

    passes: list[Pass] = [
        LoadInputsPass(shared),
        CanonicalizePass(),
        *([FoldPass()] if settings.fold and not settings.keep_structure else []),
        FindLayersPass(),
        SelectLayersPass(settings.layers, settings.skip),
    ]
    if settings.budget is not None:
        measure, target = settings.budget
        names = auto_candidates() if settings.method == "auto" else (settings.method,)
        if data_aware:
            passes.append(DataSpectraPass(methods, names, shared))
            if settings.output_weighting:
                passes.append(OutputGainsPass(shared))
        budget = BudgetPass(methods, target, measure, names, settings.rank_multiple, judge)
        if data_aware and settings.fit_aware_budget:
            budget = FitAwareBudgetPass(budget, lambda observe: factorize(None, observe))
        passes.append(budget)

    passes.append(factorize(judge))
    if data_aware and settings.refine_blocks:
        passes.append(RefinePass())
    passes.append(RewritePass())
    if settings.guarded:
        passes.append(GuardPass(provider, settings.threads, max_error=settings.max_error,
                                min_cosine=settings.min_cosine, min_metric=settings.min_metric, metric=metric))
    passes.append(CountPass())
    if settings.validate:
        passes.append(ValidatePass(provider, settings.latency, settings.threads, metric=metric))
    return Pipeline(passes)
