"""Passes and the pass manager: the compression pipeline as small steps over one workspace.

A pass holds its settings from `__init__` and does its work in `run(workspace, progress)`,
returning a `PassResult` that says whether it changed anything and what. The `PassManager` runs
a pipeline in order, times each pass, logs it and hands the progress display to long passes.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import json
import logging
import math
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnx_lowrank import __version__, methods, ranks
from onnx_lowrank.config import AUTO_METHODS, Settings
from onnx_lowrank.errors import InputError
from onnx_lowrank.fold import FoldCounts, fold_elementwise
from onnx_lowrank.graph import Layer, canonicalize, find_layers, infer_shapes, iter_graphs, model_totals
from onnx_lowrank.metrics import load_metric
from onnx_lowrank.rewrite.chain import Chain, apply_chain, chain_costs

__all__ = [
    "BudgetPass", "CalibratedFactorizePass", "CanonicalizePass", "DataSpectraPass", "CountPass", "FactorizePass", "FindLayersPass", "FoldPass", "GuardPass", "LayerDecision", "Pass",
    "PassManager", "PassResult", "RewritePass", "SelectLayersPass", "ValidatePass", "Workspace",
    "compress_pipeline",
]

log = logging.getLogger(__name__)

#: How far from a --target-macs/--target-params the planned model may land, as a fraction of the
#: whole model's cost.
TARGET_TOLERANCE = 0.02
#: Input vectors turned into moments at a time: bounds the im2col buffer (rows x D floats).
MOMENT_ROWS = 8192
#: Input vectors a layer's moments are estimated from, at most (about): a random subset past it.
MOMENT_SAMPLE_ROWS = 65536
#: How messages name each budget's measure.
MEASURE_NAMES = {"macs": "MACs", "params": "parameters", "latency": "latency"}
#: Chains timed per layer for --target-latency; the rest of its rank grid is interpolated.
LATENCY_PROBES = 5
#: Calibration samples `OutputGainsPass` perturbs: gains are averages, a few samples suffice
#: when the outputs have many independent numbers per sample ...
GAIN_SAMPLES = 8
#: ... otherwise as many as give this many numbers in all (a two-class classifier: 64 samples) ...
GAIN_FREEDOM = 64
#: ... up to this many.
MAX_GAIN_SAMPLES = 64

Tracker = Callable[[Iterable, int, str], Iterator]


def plain_tracker(items: Iterable, total: int, description: str) -> Iterator:
    """The default progress display: none."""
    return iter(items)


@dataclasses.dataclass
class PassResult:
    """What a pass did: `modified` says whether the model or the decisions changed."""

    modified: bool
    summary: str = ""


@dataclasses.dataclass
class LayerDecision:
    """What happened to one layer; `to_dict()` is the report contract's per-layer object."""

    layer: Layer
    status: str = "skipped"
    reason: str | None = None
    method: str | None = None
    ranks: tuple[int, ...] | None = None
    chain: Chain | None = None
    macs_after: int | None = None
    params_after: int | None = None
    weight_rel_error: float | None = None
    output_rel_error: float | None = None
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    output_gain: float | None = None

    def to_dict(self) -> dict:
        layer = self.layer
        rewritten = self.status == "rewritten"
        return {"name": layer.name, "op": layer.op, "method": self.method,
                "ranks": list(self.ranks) if self.ranks else None, "status": self.status,
                "reason": self.reason, "macs_before": layer.macs or 0,
                "macs_after": self.macs_after if rewritten else (layer.macs or 0),
                "params_before": layer.params,
                "params_after": self.params_after if rewritten else layer.params,
                "weight_rel_error": self.weight_rel_error, "output_rel_error": self.output_rel_error,
                "latency_ms_before": self.latency_ms_before, "latency_ms_after": self.latency_ms_after,
                "output_gain": self.output_gain}


@dataclasses.dataclass
class Workspace:
    """The state the passes share: the original and current model and the per-layer decisions."""

    original: onnx.ModelProto
    model: onnx.ModelProto
    settings: Settings
    canonical: onnx.ModelProto | None = None
    shapes: dict = dataclasses.field(default_factory=dict)
    layers: list[Layer] = dataclasses.field(default_factory=list)
    decisions: dict[str, LayerDecision] = dataclasses.field(default_factory=dict)
    totals_before: dict[str, int] = dataclasses.field(default_factory=dict)
    totals_after: dict[str, int] = dataclasses.field(default_factory=dict)
    data_spectra: dict[str, dict] = dataclasses.field(default_factory=dict)
    folds: FoldCounts = dataclasses.field(default_factory=FoldCounts)
    validation: object | None = None

    @property
    def rewritten(self) -> list[LayerDecision]:
        return [d for d in self.decisions.values() if d.status == "rewritten"]


class Pass(abc.ABC):
    """Base class: settings in `__init__`, work in `run`."""

    name = "pass"

    @abc.abstractmethod
    def run(self, workspace: Workspace, progress: Tracker) -> PassResult:
        """Do the pass's work on `workspace`; say what changed."""


class CanonicalizePass(Pass):
    """Constant weights -> initializers, auto_pad -> explicit pads, every node named."""

    name = "canonicalize"

    def run(self, workspace, progress):
        workspace.model = workspace.canonical = canonicalize(workspace.model)
        return PassResult(True, "weights as initializers, explicit pads, named nodes")


class FoldPass(Pass):
    """Fold per-channel affine nodes into the convolutions beside them and fuse hard-swish
    chains (`fold.fold_elementwise`): exact, and fewer passes over the activations."""

    name = "fold"

    def run(self, workspace, progress):
        workspace.model, workspace.folds = fold_elementwise(workspace.model)
        workspace.canonical = workspace.model
        return PassResult(workspace.folds.total > 0, workspace.folds.describe())


class FindLayersPass(Pass):
    """Infer shapes (pinned by --input-shape) and list every layer with its cost."""

    name = "find layers"

    def __init__(self, pinned: dict[str, tuple[int, ...]]):
        self.pinned = pinned

    def run(self, workspace, progress):
        model = workspace.model
        need = {t for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                for t in (*n.input[:1], *n.input[1:2], n.output[0])}
        workspace.shapes = infer_shapes(model, self.pinned, need=need, seed=workspace.settings.seed)
        workspace.layers = find_layers(model, workspace.shapes)
        workspace.totals_before = model_totals(workspace.layers)
        workspace.decisions = {layer.name: LayerDecision(layer, reason=layer.skip_reason)
                               for layer in workspace.layers}
        candidates = sum(layer.candidate for layer in workspace.layers)
        return PassResult(False, f"{len(workspace.layers)} layers, {candidates} candidates")


class SelectLayersPass(Pass):
    """Keep the candidates whose name matches `--layers` and not `--skip` (regular expressions)."""

    name = "select layers"

    def __init__(self, include: str | None, exclude: str | None):
        self.include = _compile(include, "--layers")
        self.exclude = _compile(exclude, "--skip")

    def run(self, workspace, progress):
        dropped = 0
        for decision in workspace.decisions.values():
            if decision.reason is not None:
                continue
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


class BudgetPass(Pass):
    """Allocate ranks (and, with `--method auto`, methods) across layers for a whole-model target.

    Each candidate layer offers options on a rank grid (multiples of `multiple`): their cost
    (MACs or parameters of the chain, from its template) and their relative squared weight error
    read off the spectra (Eckart–Young for SVDs, the HOSVD bound for Tucker-2), or, with
    calibration data, their relative squared output error times the layer's output gain
    (`OutputGainsPass`), i.e. the error they cause at the model's outputs. `ranks.allocate`
    picks one option or "dense" per layer so the whole model keeps at most `target` of its
    cost, with the least total error.

    With a latency judge (`--latency-aware`), a MAC or parameter budget is spent only on options
    measured faster than their layer (`_timed`), so rejected chains do not leave the target
    unmet; `--target-latency` spends the measured milliseconds themselves.
    """

    name = "allocate"

    def __init__(self, target: float, measure: str, method_names: Sequence[str],
                 tiles: tuple[int, int] = (2, 2), multiple: int = 16, judge: LatencyJudge | None = None):
        self.target = target
        self.measure = measure
        self.method_names = tuple(method_names)
        self.tiles = tiles
        self.multiple = multiple
        self.judge = judge

    def run(self, workspace, progress):
        candidates = [d for d in workspace.decisions.values() if d.reason is None]
        options = [self._options(d.layer, workspace.data_spectra.get(d.layer.name, {}),
                                 1.0 if d.output_gain is None else d.output_gain)
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
        allocation = ranks.allocate(options, self.target * total - fixed)
        timed = (" and only chains measured faster than their layers (--latency-aware)"
                 if self.judge is not None and self.measure != "latency" else "")
        if not allocation.feasible:
            lowest = (fixed + allocation.lowest_cost) / total
            raise InputError(f"{flag} {self.target:g} is unreachable with these settings; the lowest "
                             f"reachable is {lowest:.3f} of the model's {MEASURE_NAMES[self.measure]} with ranks "
                             f"in steps of {self.multiple}{timed} (a smaller --rank-multiple reaches lower)")
        if (fixed + allocation.cost) / total < self.target - TARGET_TOLERANCE:
            # The rank grid is coarse: allow the upper half of the band rather than undershoot.
            allocation = ranks.allocate(options, (self.target + TARGET_TOLERANCE) * total - fixed)
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

    def _timed(self, layer: Layer, options: ranks.LayerOptions) -> ranks.LayerOptions:
        """The options measured faster than the layer. Per method, the layer and up to
        `LATENCY_PROBES` chains spread over the MAC range are timed (`LatencyJudge`'s profiler),
        the other options' latencies interpolated in MACs between them, and options not faster
        than the original by the judge's margin dropped. For a latency budget their cost becomes
        the milliseconds; other budgets keep their cost."""
        def macs(option: ranks.Option) -> int:
            if self.measure != "params":  # `_options` costed it in MACs already
                return option.cost
            return chain_costs(methods.chain_template(layer, *option.payload, self.tiles), layer)[0]

        by_method: dict[str, list[tuple[int, ranks.Option]]] = {}
        for option in options.options:
            by_method.setdefault(option.payload[0], []).append((macs(option), option))
        in_ms = self.measure == "latency"
        timed, dense = [], None
        for group in by_method.values():
            group.sort(key=lambda pair: pair[0])
            spread = np.linspace(0, len(group) - 1, min(LATENCY_PROBES, len(group)))
            probes = list(dict.fromkeys(round(i) for i in spread))
            chains = [methods.chain_template(layer, *group[i][1].payload, self.tiles) for i in probes]
            timing = self.judge.profile(layer, chains)
            dense = timing.original.median_ms if dense is None else dense
            measured_macs = np.asarray([layer.macs] + [group[i][0] for i in probes])
            measured_ms = np.asarray([dense] + [stats.median_ms for stats in timing.chains])
            order = np.argsort(measured_macs)
            for option_macs, option in group:
                ms = float(np.interp(option_macs, measured_macs[order], measured_ms[order]))
                if ms < dense * (1 - self.judge.margin):
                    timed.append(ranks.Option(ms if in_ms else option.cost, option.error, option.payload))
        if dense is None and in_ms:  # no option to time: the layer's own latency still counts
            dense = self.judge.profile(layer, []).original.median_ms
        return ranks.LayerOptions(layer.name, dense if in_ms else options.dense_cost, timed)

    def _options(self, layer: Layer, measured: dict, gain: float = 1.0) -> ranks.LayerOptions:
        dense = layer.params if self.measure == "params" else layer.macs
        found: dict[tuple, ranks.Option] = {}
        for name in self.method_names:
            method = methods.resolved_method(layer, name)
            if methods.not_applicable(layer, method, self.tiles) is not None:
                continue
            full = methods.full_ranks(layer, method, self.tiles)
            spectra = measured.get(method) or methods.mode_spectra(layer, method, self.tiles)
            for rank_tuple, error in _error_curve(method, full, spectra, self.multiple):
                macs, params = chain_costs(methods.chain_template(layer, method, rank_tuple, self.tiles), layer)
                cost = params if self.measure == "params" else macs
                if cost < dense:
                    found.setdefault((method, rank_tuple), ranks.Option(cost, gain * error, (method, rank_tuple)))
        return ranks.LayerOptions(layer.name, dense, list(found.values()))


class DataSpectraPass(Pass):
    """Measure every candidate layer's error-versus-rank in output units on calibration data.

    One walk over the ORIGINAL model (independent statistics) gives each layer's input second
    moments, from which `methods.data_spectra` reads whitened spectra; the budget allocator then
    spends the budget where the OUTPUT error per MAC saved is smallest, not the weight error.
    """

    name = "data spectra"

    def __init__(self, feeds: Sequence[dict], method_names: Sequence[str], tiles: tuple[int, int] = (2, 2)):
        self.feeds = feeds
        self.method_names = tuple(method_names)
        self.tiles = tiles

    def run(self, workspace, progress):
        from onnx_lowrank import calibrate

        todo = {d.layer.name: d.layer for d in workspace.decisions.values()
                if d.reason is None and d.layer.subgraph is None}

        def visit(layer, xs, xts):
            if layer.name in todo and layer.op != "ConvTranspose":
                moments = layer_moments(layer, xs, None)
                workspace.data_spectra[layer.name] = {
                    methods.resolved_method(layer, name): methods.data_spectra(layer, name, moments, self.tiles)
                    for name in self.method_names
                    if methods.not_applicable(layer, methods.resolved_method(layer, name), self.tiles) is None}
            return None

        calibrate.walk_layers(workspace.canonical, list(todo.values()), self.feeds, visit, sequential=False,
                              progress=progress)
        return PassResult(False, f"output-error spectra of {len(workspace.data_spectra)} layers")


class OutputGainsPass(Pass):
    """Measure how strongly each candidate layer's output error reaches the model's outputs.

    `calibrate.output_gains` perturbs each layer's output by relative noise on a few calibration
    batches and measures the relative change of the model's outputs; the budget allocator then
    weighs each layer's error curve by that gain, so layers near a head (or feeding a sensitive
    branch) are cut less than layers whose errors the rest of the model damps.
    """

    name = "output gains"

    def __init__(self, feeds: Sequence[dict], pinned: dict[str, tuple[int, ...]] | None = None):
        self.feeds = feeds
        self.pinned = pinned or {}

    def run(self, workspace, progress):
        from onnx_lowrank import calibrate

        todo = [d.layer for d in workspace.decisions.values() if d.reason is None and d.layer.subgraph is None]
        measured = set(calibrate.measured_outputs(workspace.canonical))
        shapes = workspace.shapes
        if not measured <= shapes.keys():   # e.g. logits behind a Reshape that inference cannot follow
            shapes = infer_shapes(workspace.canonical, self.pinned, need=measured, seed=workspace.settings.seed)
        freedom = calibrate.output_freedom(workspace.canonical, shapes)
        feeds, samples = _first_samples(self.feeds, gain_samples(freedom))
        gains = calibrate.output_gains(workspace.canonical, todo, feeds, progress=progress)
        for name, gain in gains.items():
            workspace.decisions[name].output_gain = gain
        spread = f" (from {min(gains.values()):.3g} to {max(gains.values()):.3g})" if gains else ""
        return PassResult(False, f"output gains of {len(gains)} layers{spread}, on {samples} samples")


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


def layer_moments(layer: Layer, xs: Sequence[np.ndarray], xts: Sequence[np.ndarray] | None,
                  rows: int = MOMENT_SAMPLE_ROWS):
    """Second moments of the layer's input vectors over all batches (paired with `xts` if given).

    A layer that sees more than about `rows` vectors in the whole calibration set (a conv at high
    resolution: one per output position and image) uses a uniform random subset of them, the
    same positions in `xs` and `xts`, seeded by the layer's name: neighbouring patches are
    strongly correlated, so the subset estimates the moments as well at a fraction of the cost.
    """
    from onnx_lowrank import calibrate
    from onnx_lowrank.factorize import data

    moments = data.Moments()
    rng = np.random.default_rng(zlib.crc32(layer.name.encode()))
    keep = None
    for index, x in enumerate(xs):
        if keep is None:
            keep = min(1.0, rows / (calibrate.vector_count(layer, x) * len(xs)))
        originals = calibrate.layer_vectors(layer, x, MOMENT_ROWS)
        if xts is None:
            chunks = ((p, None) for p in originals)
        else:
            chunks = zip(originals, calibrate.layer_vectors(layer, xts[index], MOMENT_ROWS), strict=True)
        for p, pt in chunks:
            chosen = rng.random(p.shape[1]) < keep if keep < 1.0 else slice(None)
            moments.add(p[:, chosen], None if pt is None else pt[:, chosen])
    return moments


def _error_curve(method: str, full: tuple[int, ...], spectra, multiple: int):
    """(ranks, relative squared error) on the rank grid of each mode."""
    grids = [ranks.rank_grid(f, multiple) for f in full]
    if method == "tucker2":
        pairs = [(rt, rs) for rt in grids[0] for rs in grids[1]
                 if 0.5 <= (rt / full[0]) / (rs / full[1]) <= 2.0]
        errors = ranks.tucker_error_curve(spectra[0], spectra[1], pairs)
        return list(zip(pairs, errors))
    errors = ranks.svd_error_curve(spectra[0], grids[0])
    return [((r,), e) for r, e in zip(grids[0], errors)]


class LatencyJudge:
    """Keeps a chain only where it is measured faster than the original layer (`--latency-aware`).

    Each layer and its chain are timed alone, interleaved, on the deployment provider with the
    layer's real input shape (`latency.profile_layer`, cached on disk); a chain must beat the
    original's median by `margin` (relative) to count as faster, a guard against timing noise.
    A chain found no faster is timed once more, afresh (a disturbed measurement, perhaps from the
    cache, must not reject it for good), and the second measurement decides.
    """

    def __init__(self, provider: str, threads: int | None = None, margin: float = 0.05,
                 cache=None, timer=None):
        self.provider = provider
        self.threads = threads
        self.margin = margin
        self.cache = cache
        self.timer = timer

    def profile(self, layer: Layer, chains: Sequence[Chain], refresh: bool = False):
        """`latency.profile_layer` of the layer and `chains` on this judge's provider, threads,
        cache and timer."""
        from onnx_lowrank import latency

        return latency.profile_layer(layer, chains, provider=self.provider, threads=self.threads, cache=self.cache,
                                     timer=self.timer, refresh=refresh)

    def __call__(self, decision: LayerDecision) -> None:
        from onnx_lowrank import latency

        if decision.status != "rewritten":
            return
        for refresh in (False, True):
            timing = self.profile(decision.layer, [decision.chain], refresh=refresh)
            faster = latency.faster_than_original(timing, self.margin)[0]
            if faster:
                break
        decision.latency_ms_before = timing.original.median_ms
        decision.latency_ms_after = timing.chains[0].median_ms
        if not faster:
            decision.status = "skipped"
            decision.reason = (f"measured no faster on {timing.provider}: {timing.chains[0].median_ms:.3f} ms "
                               f"against {timing.original.median_ms:.3f} ms (margin {self.margin:.0%})")


def _plan_job(job) -> "methods.Plan":
    layer, method, policy, tiles, seed, preset = job
    return methods.plan(layer, method, policy, tiles=tiles, seed=seed, ranks=preset)


class FactorizePass(Pass):
    """Factorize every selected layer (in `jobs` processes); keep chains that cut MACs.

    Ranks come from the budget allocation when it ran, else from the rank policy.
    """

    name = "factorize"

    def __init__(self, method: str, policy, tiles: tuple[int, int] = (2, 2), seed: int = 0,
                 require_savings: bool = True, jobs: int = 1, judge: LatencyJudge | None = None):
        self.method = method
        self.policy = policy
        self.tiles = tiles
        self.seed = seed
        self.require_savings = require_savings
        self.jobs = jobs
        self.judge = judge

    def run(self, workspace, progress):
        todo = [d for d in workspace.decisions.values() if d.reason is None]
        work = [(d.layer, d.method or self.method, self.policy, self.tiles, self.seed, d.ranks)
                for d in todo]
        description = f"factorizing ({self.method})"
        if self.jobs > 1 and len(work) > 1:
            with concurrent.futures.ProcessPoolExecutor(self.jobs) as pool:
                plans = list(progress(pool.map(_plan_job, work), len(work), description))
        else:
            plans = list(progress(map(_plan_job, work), len(work), description))
        for decision, plan in zip(todo, plans, strict=True):
            self._decide(decision, plan)
        if self.judge is not None:
            for decision in progress(list(workspace.rewritten), len(workspace.rewritten), "timing layers"):
                self.judge(decision)
        done = len(workspace.rewritten)
        return PassResult(done > 0, f"{done} of {len(todo)} layers factorized")

    def _decide(self, decision: LayerDecision, plan) -> None:
        layer = decision.layer
        decision.method = plan.method
        decision.ranks = plan.ranks
        if plan.skip_reason is not None:
            decision.reason = plan.skip_reason
            return
        decision.chain = plan.chain
        decision.macs_after, decision.params_after = plan.macs, plan.params
        decision.weight_rel_error = plan.weight_rel_error
        if self.require_savings and plan.macs >= (layer.macs or 0):
            decision.reason = (f"ranks {list(plan.ranks)} give {plan.macs:,} MACs, "
                               f"not fewer than the original {layer.macs:,}")
            return
        decision.status = "rewritten"


class CalibratedFactorizePass(FactorizePass):
    """Data-aware factorization: each layer is fit to its outputs on calibration inputs.

    `calibrate.walk_layers` visits the layers in topological order; each layer's input vectors
    (im2col patches, or rows) are reduced to second moments, in float64 and streamed, so memory
    does not grow with the calibration set. In sequential mode the moments pair the ORIGINAL
    input with the input of the model compressed so far, and the fit maps the latter onto the
    original output, correcting the errors of earlier layers.
    """

    name = "factorize (data-aware)"

    def __init__(self, method: str, policy, feeds: Sequence[dict], tiles: tuple[int, int] = (2, 2),
                 seed: int = 0, sequential: bool = True, refit: bool = True, bias_correction: bool = True,
                 provider: str = "cpu", require_savings: bool = True, judge: LatencyJudge | None = None):
        super().__init__(method, policy, tiles=tiles, seed=seed, require_savings=require_savings, judge=judge)
        self.feeds = feeds
        self.sequential = sequential
        self.refit = refit
        self.bias_correction = bias_correction
        self.provider = provider

    def run(self, workspace, progress):
        from onnx_lowrank import calibrate

        todo = {d.layer.name: d for d in workspace.decisions.values()
                if d.reason is None and d.layer.subgraph is None}

        def visit(layer, xs, xts):
            decision = todo.get(layer.name)
            if decision is None:
                return None
            if layer.op == "ConvTranspose" or methods.resolved_method(layer, decision.method or self.method) \
                    in methods.VERSATILE:  # weight-only fits: no patch statistics for them
                self._decide(decision, methods.plan(layer, decision.method or self.method, self.policy,
                                                    tiles=self.tiles, seed=self.seed, ranks=decision.ranks))
                return decision.chain if decision.status == "rewritten" else None
            moments = layer_moments(layer, xs, xts if self.sequential else None)
            fit = methods.DataFit(moments, refit=self.refit, bias_correction=self.bias_correction)
            plan = methods.plan(layer, decision.method or self.method, self.policy, tiles=self.tiles,
                                seed=self.seed, ranks=decision.ranks, data=fit)
            self._decide(decision, plan)
            if self.judge is not None:
                self.judge(decision)
            return decision.chain if decision.status == "rewritten" else None

        layers = [d.layer for d in workspace.decisions.values() if d.layer.subgraph is None
                  and d.layer.weight is not None]
        calibrate.walk_layers(workspace.canonical, layers, self.feeds, visit, sequential=self.sequential,
                              provider=self.provider, progress=progress)
        done = len(workspace.rewritten)
        mode = "sequential" if self.sequential else "independent"
        return PassResult(done > 0, f"{done} of {len(todo)} layers fit to calibration data ({mode})")


class RewritePass(Pass):
    """Replace each factorized layer by its chain, clean up, record provenance, check the model."""

    name = "rewrite"

    def run(self, workspace, progress):
        if not workspace.rewritten:
            return PassResult(False, "nothing to rewrite")
        if workspace.settings.keep_structure:
            workspace.model = projected_model(workspace)
            summary = f"{len(workspace.rewritten)} layers given low-rank weights, graph kept"
        else:
            workspace.model = rewritten_model(workspace)
            summary = f"{len(workspace.rewritten)} layers replaced by chains"
        if _passes_checker(workspace.original):
            onnx.checker.check_model(workspace.model)
        return PassResult(True, summary)


def projected_model(workspace: Workspace) -> onnx.ModelProto:
    """The canonical model with each factorized layer's weight replaced by its chain's kernel.

    Same nodes, same cost: the projection step of low-rank-aware training (Lee et al.,
    DeepTwist). A data-aware bias shift replaces the bias too. New initializers are named after
    the node, so a weight shared with other nodes stays as it is for them.
    """
    model = onnx.ModelProto()
    model.CopyFrom(workspace.canonical)
    nodes = {node.name: node for node in model.graph.node}
    for decision in workspace.rewritten:
        layer, node = decision.layer, nodes[decision.layer.name]
        kernel = methods.chain_kernel(layer, decision.chain).astype(layer.weight.dtype)
        weight_name = f"{layer.name}/lowrank/projected_weight"
        model.graph.initializer.append(numpy_helper.from_array(kernel, weight_name))
        position = list(node.input).index(layer.weight_name)
        node.input[position] = weight_name
        if decision.chain.bias is not None:
            bias_name = f"{layer.name}/lowrank/projected_bias"
            model.graph.initializer.append(
                numpy_helper.from_array(decision.chain.bias.astype(layer.weight.dtype), bias_name))
            if len(node.input) > 2:
                node.input[2] = bias_name
            else:
                node.input.append(bias_name)
        decision.macs_after, decision.params_after = layer.macs, layer.params
    used = {name for graph, _ in iter_graphs(model.graph) for n in graph.node for name in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return _with_model_fields(workspace.canonical, model, workspace.settings)


def rewritten_model(workspace: Workspace) -> onnx.ModelProto:
    """The canonical model with every layer whose decision is "rewritten" replaced by its chain."""
    graph = gs.import_onnx(workspace.canonical)
    nodes = {node.name: node for node in graph.nodes}
    docs = {}
    for decision in workspace.rewritten:
        built = apply_chain(graph, nodes[decision.layer.name], decision.layer, decision.chain)
        docs.update({node.name: decision.chain.describe(decision.layer) for node in built})
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    rewritten = gs.export_onnx(graph, do_type_check=False)
    for node in rewritten.graph.node:
        if node.name in docs:
            node.doc_string = docs[node.name]
    return _with_model_fields(workspace.canonical, rewritten, workspace.settings)


def layer_output_errors(workspace: Workspace, feeds: Sequence[dict], provider: str,
                        threads: int | None) -> dict[str, float]:
    """Each rewritten layer's own output error `||y - y'|| / ||y||` on the layer's ORIGINAL inputs.

    One onnxruntime run of the canonical model with every chain attached beside its layer gives
    all of them at once, without the errors of earlier layers mixed in.
    """
    from onnx_lowrank import runtime

    graph = gs.import_onnx(workspace.canonical)
    nodes = {node.name: node for node in graph.nodes}
    pairs = {}
    for decision in workspace.rewritten:
        node = nodes[decision.layer.name]
        built = apply_chain(graph, node, decision.layer, decision.chain, replace=False)
        pairs[decision.layer.name] = (node.outputs[0], built[-1].outputs[0])
        for tensor in pairs[decision.layer.name]:
            tensor.dtype = tensor.dtype or decision.layer.weight.dtype
    graph.outputs = [tensor for pair in pairs.values() for tensor in pair]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    probe = _with_model_fields(workspace.canonical, gs.export_onnx(graph, do_type_check=False),
                               workspace.settings)
    session = runtime.make_session(probe, provider, threads, produced=True, label="the layer-error probe")
    residual = dict.fromkeys(pairs, 0.0)
    energy = dict.fromkeys(pairs, 0.0)
    for feed in feeds:
        values = dict(zip((o.name for o in session.get_outputs()), session.run(None, feed)))
        for name, (original, chain) in pairs.items():
            reference = values[original.name].astype(np.float64)
            residual[name] += float(np.sum((reference - values[chain.name]) ** 2))
            energy[name] += float(np.sum(reference ** 2))
    return {name: float(np.sqrt(residual[name] / energy[name])) if energy[name] > 0 else 0.0
            for name in pairs}


class GuardPass(Pass):
    """Roll back layers until the requested error bounds hold.

    `max_error`: every rewritten layer whose own output error (see `layer_output_errors`)
    exceeds it goes back to its original node. `min_cosine` / `min_metric`: end to end, the fewest
    layers with the largest own errors are rolled back (found by bisection) until the worst output
    cosine, or the task metric, reaches the bound.
    """

    name = "guard"

    def __init__(self, feeds: Sequence[dict], provider: str, threads: int | None,
                 max_error: float | None = None, min_cosine: float | None = None,
                 min_metric: float | None = None, metric=None):
        self.feeds = feeds
        self.provider = provider
        self.threads = threads
        self.max_error = max_error
        self.min_cosine = min_cosine
        self.min_metric = min_metric
        self.metric = metric

    def run(self, workspace, progress):
        if not workspace.rewritten:
            return PassResult(False, "nothing to guard")
        errors = layer_output_errors(workspace, self.feeds, self.provider, self.threads)
        for decision in workspace.rewritten:
            decision.output_rel_error = errors[decision.layer.name]
        rolled = 0
        if self.max_error is not None:
            for decision in workspace.rewritten:
                if decision.output_rel_error > self.max_error:
                    _roll_back(decision, f"its output error {decision.output_rel_error:.3g} is over "
                                         f"--max-error {self.max_error:g}")
                    rolled += 1
        if self.min_cosine is not None or self.min_metric is not None:
            rolled += self._hold_end_to_end(workspace)
        if rolled:
            workspace.model = rewritten_model(workspace) if workspace.rewritten else workspace.canonical
        return PassResult(rolled > 0, f"{rolled} layers rolled back")

    def _hold_end_to_end(self, workspace: Workspace) -> int:
        worst_first = sorted(workspace.rewritten, key=lambda d: -d.output_rel_error)
        if self._holds(workspace, 0, worst_first):
            return 0
        low, high = 1, len(worst_first)
        while low < high:
            middle = (low + high) // 2
            if self._holds(workspace, middle, worst_first):
                high = middle
            else:
                low = middle + 1
        bound = (f"--min-cosine {self.min_cosine:g}" if self.min_cosine is not None
                 else f"--min-metric {self.min_metric:g}")
        for decision in worst_first[:low]:
            _roll_back(decision, f"rolled back to meet {bound} (output error {decision.output_rel_error:.3g})")
        return low

    def _holds(self, workspace: Workspace, count: int, worst_first: list[LayerDecision]) -> bool:
        from onnx_lowrank import compare

        kept = worst_first[count:]
        if not kept:
            return True
        trial = dataclasses.replace(workspace, decisions={d.layer.name: d for d in kept})
        result = compare.compare_models(workspace.original, rewritten_model(trial), self.feeds,
                                        provider=self.provider, metric=self.metric, threads=self.threads,
                                        candidate_produced=True)
        cosine = min((o.cosine for o in result.outputs), default=1.0)
        if self.min_cosine is not None and cosine < self.min_cosine:
            return False
        return self.min_metric is None or (result.metric is not None and result.metric >= self.min_metric)


def _roll_back(decision: LayerDecision, reason: str) -> None:
    decision.status = "rolled_back"
    decision.reason = reason


def _passes_checker(model: onnx.ModelProto) -> bool:
    """Whether the ONNX checker accepts `model`; some exporters' output does not pass it."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        log.info("the input model does not pass the ONNX checker (%s)", str(exc).splitlines()[0])
        return False
    return True


def _with_model_fields(source: onnx.ModelProto, rewritten: onnx.ModelProto,
                       settings: Settings) -> onnx.ModelProto:
    """The rewritten graph with the source's opsets, IR version, producer and metadata, plus provenance."""
    out = onnx.ModelProto()
    out.CopyFrom(source)
    out.graph.CopyFrom(rewritten.graph)
    provenance = {"onnx_lowrank.version": __version__,
                  "onnx_lowrank.settings": json.dumps(settings.provenance(), sort_keys=True)}
    kept = [p for p in out.metadata_props if p.key not in provenance]
    del out.metadata_props[:]
    out.metadata_props.extend(kept)
    for key, value in provenance.items():
        out.metadata_props.add(key=key, value=value)
    return out


class CountPass(Pass):
    """Count MACs and parameters of the rewritten model from the model itself, not from the plan."""

    name = "count"

    def __init__(self, pinned: dict[str, tuple[int, ...]]):
        self.pinned = pinned

    def run(self, workspace, progress):
        model = workspace.model
        need = {t for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                for t in (*n.input[:2], n.output[0])}
        shapes = infer_shapes(model, self.pinned, need=need, seed=workspace.settings.seed)
        workspace.totals_after = model_totals(find_layers(model, shapes))
        return PassResult(False, "MACs {macs:,}, params {params:,}".format(**workspace.totals_after))


class ValidatePass(Pass):
    """Run the original and the compressed model in onnxruntime and compare (numerics, latency)."""

    name = "validate"

    def __init__(self, feeds: Sequence[dict], provider: str, latency: bool, threads: int | None,
                 metric=None):
        self.feeds = feeds
        self.provider = provider
        self.latency = latency
        self.threads = threads
        self.metric = metric

    def run(self, workspace, progress):
        from onnx_lowrank import compare, timing as timed

        result = compare.compare_models(workspace.original, workspace.model, self.feeds,
                                        provider=self.provider, metric=self.metric, threads=self.threads,
                                        candidate_produced=True)
        if self.latency:
            timing = timed.compare_latency(workspace.original, workspace.model, self.feeds[0],
                                           provider=self.provider, threads=self.threads,
                                           candidate_produced=True)
            result = dataclasses.replace(result, latency_before=timing.before,
                                         latency_after=timing.after, speedup=timing.speedup)
        workspace.validation = result
        worst = min((o.cosine for o in result.outputs), default=1.0)
        return PassResult(False, f"{result.provider}: worst output cosine {worst:.6f}")


class PassManager:
    """Runs passes in order, timing and logging each; `tracker` drives a progress display."""

    def __init__(self, passes: Sequence[Pass], tracker: Tracker = plain_tracker):
        self.passes = list(passes)
        self.tracker = tracker
        self.timings: list[tuple[str, float, PassResult]] = []

    def run(self, workspace: Workspace) -> Workspace:
        for step in self.passes:
            start = time.perf_counter()
            result = step.run(workspace, self.tracker)
            elapsed = time.perf_counter() - start
            self.timings.append((step.name, elapsed, result))
            log.info("%s: %s (%.2f s)", step.name, result.summary, elapsed)
        return workspace


def rank_policy(settings: Settings):
    """The per-layer rank policy of the settings (budgets plan ranks in `BudgetPass` instead)."""
    if settings.rank is not None:
        return ranks.FixedRank(settings.rank)
    if settings.energy is not None:
        return ranks.Snapped(ranks.Energy(settings.energy), settings.rank_multiple)
    if settings.vbmf:
        return ranks.Snapped(ranks.VBMF(), settings.rank_multiple)
    return ranks.RankRatio(settings.rank_ratio or 1.0)


def compress_pipeline(settings: Settings, pinned: dict[str, tuple[int, ...]],
                      feeds: Sequence[dict] | None, calib_feeds: Sequence[dict] | None = None) -> list[Pass]:
    """The passes `compress` runs for these settings, in order.

    `calib_feeds` fit the data-aware factorizations; `feeds` check the result (guard, validation).
    """
    passes: list[Pass] = [
        CanonicalizePass(),
        *([FoldPass()] if settings.fold and not settings.keep_structure else []),
        FindLayersPass(pinned),
        SelectLayersPass(settings.layers, settings.skip),
    ]
    data_aware = settings.calib is not None and settings.data_aware
    judge = None
    if settings.latency_aware or settings.target_latency is not None:
        from onnx_lowrank.latency import LatencyCache

        judge = LatencyJudge(settings.provider, settings.threads, settings.latency_margin, LatencyCache())
    if settings.budget is not None:
        measure, target = settings.budget
        names = AUTO_METHODS if settings.method == "auto" else (settings.method,)
        if data_aware:
            passes.append(DataSpectraPass(calib_feeds, names, settings.tiles))
            if settings.output_weighting:
                passes.append(OutputGainsPass(calib_feeds, pinned))
        passes.append(BudgetPass(target, measure, names, settings.tiles, settings.rank_multiple, judge))
    if data_aware:
        passes.append(CalibratedFactorizePass(
            settings.method, rank_policy(settings), calib_feeds, tiles=settings.tiles, seed=settings.seed,
            sequential=settings.sequential, refit=settings.refit,
            bias_correction=settings.bias_correction, provider="cpu", judge=judge))
    else:
        passes.append(FactorizePass(settings.method, rank_policy(settings), tiles=settings.tiles,
                                    seed=settings.seed, jobs=settings.jobs, judge=judge))
    passes.append(RewritePass())
    if settings.guarded:
        metric = load_metric(settings.metric) if settings.metric else None
        passes.append(GuardPass(feeds, settings.provider, settings.threads, max_error=settings.max_error,
                                min_cosine=settings.min_cosine, min_metric=settings.min_metric,
                                metric=metric))
    passes.append(CountPass(pinned))
    if settings.validate and feeds:
        passes.append(ValidatePass(feeds, settings.provider, settings.latency, settings.threads,
                                   metric=load_metric(settings.metric) if settings.metric else None))
    return passes
