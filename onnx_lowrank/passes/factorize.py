"""The factorize pass: every selected layer fitted by its method, with calibration statistics or without."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator

from onnx_lowrank import calibrate, iterations
from onnx_lowrank.activation_fit import sample_rows
from onnx_lowrank.fitting import Plan, fit_layer
from onnx_lowrank.graph import Layer
from onnx_lowrank.methods import MethodSet
from onnx_lowrank.nonlinearity import activations_after
from onnx_lowrank.passes.base import LayerDecision, Pass, PassResult
from onnx_lowrank.passes.judge import LatencyJudge
from onnx_lowrank.rewrite.chain import chain_costs

__all__ = ["FactorizePass"]


class FactorizePass(Pass):
    """Factorize every selected layer; keep the chains that cut MACs.

    Ranks come from the budget allocation when it ran, else from the rank policy. A chain that
    does not cut MACs is left out unless `require_savings` is off (full-rank checks). Without
    calibration feeds (or with `data_aware` off) each layer is fitted to its weight alone. With
    them, `calibrate.walk_layers` visits the layers in topological order and each is fitted to its
    OUTPUT on the calibration inputs (`fitting.fit_layer` with the layer's input moments): its
    input vectors (im2col patches, or rows) are reduced to float64 second moments, streamed, so
    memory does not grow with the calibration set. In sequential mode the moments pair the
    ORIGINAL input with the input of the model compressed so far, and the fit maps the latter onto
    the original output, correcting the errors of earlier layers (Zhang et al. 2016, asymmetric);
    the layers are then fitted one after the other. Weight-only and independent data-aware fits
    run in `jobs` processes. With a latency judge, every rewritten chain is timed against its
    layer and kept only when faster.
    """

    name = "factorize"
    requires = ("layers",)
    provides = ("chains",)

    def __init__(self, methods: MethodSet, method: str, policy, data_aware: bool = False, sequential: bool = True,
                 refit: bool = True, bias_correction: bool = True, jobs: int = 1, judge: LatencyJudge | None = None,
                 require_savings: bool = True, activation_aware: bool = False,
                 observe: Callable[[Layer, list, list], None] | None = None):
        self.methods = methods
        self.method = method
        self.policy = policy
        self.data_aware = data_aware
        if data_aware:
            self.requires = (*self.requires, "calibration")
        self.sequential = sequential
        self.refit = refit
        self.bias_correction = bias_correction
        self.jobs = jobs
        self.judge = judge
        self.require_savings = require_savings
        self.activation_aware = activation_aware
        self.observe = observe

    def run(self, workspace, progress):
        todo = workspace.candidates
        with _Workers(self.jobs) as workers:
            if self.data_aware:
                mode = "sequential" if self.sequential else "independent"
                self._fit_to_data(workspace, todo, workers, progress)
            else:
                mode = "weights only"
                plans = workers.map(fit_layer, [(d.layer, self._method(d), d.ranks, self.policy) for d in todo])
                for decision, plan in zip(todo, progress(plans, len(todo), f"factorizing ({self.method})"), strict=True):
                    self._decide(decision, plan)
        _share_factors(workspace.rewritten)
        if self.judge is not None:
            for decision in progress(list(workspace.rewritten), len(workspace.rewritten), "timing layers"):
                self.judge(decision)
        done = len(workspace.rewritten)
        processes = f" in {self.jobs} processes" if self.jobs > 1 else ""
        return PassResult(done > 0, f"{done} of {len(todo)} layers factorized ({mode}){processes}")

    def _method(self, decision: LayerDecision):
        return self.methods.serving(decision.method or self.method, decision.layer)

    def _fit_to_data(self, workspace, todo: list[LayerDecision], workers: _Workers, progress) -> None:
        """One walk over the calibration inputs; each candidate they reach fitted at its visit.

        The walk runs on the view of the canonical model with the If branches the calibration
        inputs take inlined (`Workspace.view`), so the layers of those branches are fitted like
        main-graph ones. A layer in a Loop or Scan body is fitted to its inputs in every iteration
        of the ORIGINAL model (`iterations`: not sequential); a layer no calibration input runs
        (another branch) is fitted to its weights. Both say so. Activation-aware fitting takes
        main-graph layers only (`nonlinearity.activations_after`): the layers of bodies, inlined
        If branches included, get the linear fit.

        In sequential mode the visit must return the layer's chain (the walk carries the
        compressed world through it), so the fit waits for its job; in independent mode the jobs
        run while the walk goes on and are collected after it.
        """
        view = workspace.view(workspace.calibration)
        by_name = {d.layer.name: d for d in todo if view.holds(d.layer.subgraph)}
        activations = (activations_after(workspace.canonical, [d.layer for d in todo]) if self.activation_aware
                       else {})
        pending: list[tuple[LayerDecision, concurrent.futures.Future]] = []

        def visit(layer, xs, xts):
            if self.observe is not None:
                self.observe(layer, xs, xts)
            decision = by_name.get(layer.name)
            if decision is None:
                return None
            method = self._method(decision)
            moments = (calibrate.layer_moments(layer, xs, xts if self.sequential else None, workspace.memory)
                       if method.uses_data(layer) else None)
            activation = activations.get(layer.name) if moments is not None and moments.dense else None
            samples = (calibrate.layer_samples(layer, xs, xts, sample_rows(layer, workspace.memory))
                       if activation is not None else None)
            job = workers.submit(fit_layer, layer, method, decision.ranks, self.policy, moments, self.refit,
                                 self.bias_correction, activation, samples)
            if not self.sequential:
                pending.append((decision, job))
                return None
            self._decide(decision, job.result())
            return decision.chain if decision.status == "rewritten" else None

        layers = [d.layer for d in workspace.decisions.values() if view.holds(d.layer.subgraph)
                  and d.layer.weight is not None]
        calibrate.walk_layers(view.model, layers, workspace.calibration, visit, sequential=self.sequential,
                              provider="cpu", progress=progress, activation_limit=workspace.memory.activations)
        for decision, job in pending:
            self._decide(decision, job.result())
        unreached = [d for d in todo if d.layer.name not in by_name]
        inputs = iterations.gather(view, workspace.canonical, [d.layer for d in unreached], workspace.calibration)
        for decision in unreached:
            layer, method, xs = decision.layer, self._method(decision), inputs.get(decision.layer.name)
            moments = calibrate.layer_moments(layer, xs, None, workspace.memory) if xs and method.uses_data(layer) \
                else None
            self._decide(decision, fit_layer(layer, method, decision.ranks, self.policy, moments, self.refit,
                                             self.bias_correction))
            if decision.status == "rewritten":
                decision.reason = (f"fitted to its inputs in every iteration of {layer.scope}, from the original "
                                   "model" if xs else f"fitted to its weights only: no calibration input runs "
                                   f"{layer.scope}")

    def _decide(self, decision: LayerDecision, plan: Plan) -> None:
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


def _share_factors(rewritten: list[LayerDecision]) -> None:
    """Layers in different bodies that read one weight (the branches of an If) take one chain:
    that of the first fitted to data where one was (its decision has no note), else the first's.
    The rewrite then places the factors once, where the weight was (`rewrite.scoped`)."""
    groups: dict[tuple, list[LayerDecision]] = {}
    for decision in rewritten:
        layer = decision.layer
        if layer.subgraph is not None:
            key = (layer.weight_name, layer.bias_name, layer.op, layer.conv, layer.gemm, layer.weight_side)
            groups.setdefault(key, []).append(decision)
    for group in groups.values():
        if len({d.layer.subgraph for d in group}) < len(group):
            continue
        leader = min(group, key=lambda d: d.reason is not None)
        for decision in group:
            if decision is not leader:
                decision.method, decision.ranks, decision.chain = leader.method, leader.ranks, leader.chain
                decision.macs_after, decision.params_after = chain_costs(leader.chain, decision.layer)
                decision.weight_rel_error = leader.weight_rel_error
                decision.reason = f"shares the factors of '{leader.layer.name}' (one weight)"


class _Done:
    """A job run at once, for `_Workers` without processes."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Workers:
    """Jobs in `jobs` processes, or in this one when `jobs` is 1. At most `2·jobs` submitted jobs
    are in flight: each holds its arguments (a layer's moments) until it is done."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.pool = concurrent.futures.ProcessPoolExecutor(jobs) if jobs > 1 else None
        self.in_flight: list[concurrent.futures.Future] = []

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=exc[0] is not None)

    def map(self, fn: Callable, arguments: list[tuple]) -> Iterator:
        """`fn(*args)` for each tuple, in order, lazily."""
        if self.pool is None:
            return (fn(*args) for args in arguments)
        return self.pool.map(fn, *zip(*arguments, strict=True)) if arguments else iter(())

    def submit(self, fn: Callable, *args):
        """`fn(*args)` as a job with `result()`."""
        if self.pool is None:
            return _Done(fn(*args))
        self.in_flight = [job for job in self.in_flight if not job.done()]
        if len(self.in_flight) >= 2 * self.jobs:
            concurrent.futures.wait(self.in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
        job = self.pool.submit(fn, *args)
        self.in_flight.append(job)
        return job
