"""Fit one layer's chain: the method's factorization, then the method-independent steps.

`fit_layer` asks the layer's `Method` for its chain (weight-only, or fitted to the layer's input
moments on calibration data), then, with statistics, refits the chain's last stage by ridge least
squares against the original layer's output and shifts the bias by the remaining mean difference
(data-aware.md, ingredient 2), flushes subnormal weights, and costs the chain. The refit reads
only the chain (its stages, groups and channel shuffles), so it serves every method.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from onnx_lowrank import factorize
from onnx_lowrank.activation_fit import fit_through_activation
from onnx_lowrank.factorize import refit as refits
from onnx_lowrank.factorize.whiten import shrinkage
from onnx_lowrank.factorize.base import NumericalError, relative_error
from onnx_lowrank.graph import Layer
from onnx_lowrank.methods import Method
from onnx_lowrank.rewrite.chain import Chain, ConvStage, ShuffleStage, VersatileChain, chain_costs, flush_subnormals

__all__ = ["RIDGE", "Plan", "chain_kernel", "fit_layer"]

#: Ridge of the least-squares refit, relative to the mean variance (data-aware.md: 1e-3 worked).
RIDGE = 1e-3


@dataclasses.dataclass(frozen=True)
class Plan:
    """A layer's factorization under one method: the chain, its cost, or why there is none."""

    method: str
    ranks: tuple[int, ...] | None = None
    chain: Chain | VersatileChain | None = None
    macs: int | None = None
    params: int | None = None
    weight_rel_error: float | None = None
    skip_reason: str | None = None


def fit_layer(layer: Layer, method: Method, ranks: tuple[int, ...] | None = None, policy=None, stats=None,
              refit: bool = True, bias_correction: bool = True, activation=None, samples=None) -> Plan:
    """Factorize `layer` with `method` (the one serving it: `MethodSet.serving`) and build its chain.

    Ranks: `ranks` when given, else those `policy` picks from the method's full ranks (and weight
    spectra when the policy reads them); unranked methods have none. With `stats` (the layer's
    input moments, dense `factorize.moments.Moments` or `SampleMoments`), the factorization minimises the layer's OUTPUT
    error on the calibration inputs, then (`refit`, `bias_correction`) the last stage is refit and
    the bias shifted (`refit_chain`). With an `activation` after the layer and `samples` of its
    input vectors (``(p, p~)``, `calibrate.layer_samples`), the chain is then fitted to the
    response after the activation (`activation_fit.fit_through_activation`, Zhang et al. 2016)
    and kept when that fits held-out vectors better. A numerical failure (`factorize.NumericalError`, numpy's
    `LinAlgError`) skips the layer with its reason; any other exception is a bug and propagates.
    """
    reason = method.not_applicable(layer)
    if reason is not None:
        return Plan(method.name, skip_reason=reason)
    if method.ranked and ranks is None:
        spectra = method.spectra(layer) if getattr(policy, "uses_spectra", True) else None
        ranks = policy.ranks(method.full_ranks(layer), spectra)
    stats = stats if method.uses_data(layer) else None
    # A method whose data-aware fit needs dense moments fits the weight; the refit still uses the data.
    factor_stats = stats if stats is None or stats.dense or method.sample_space else None
    try:
        chain = _fitted(layer, method, ranks, factor_stats, stats, refit, bias_correction)
        if activation is not None and samples is not None and isinstance(chain, Chain):
            refitted = functools.partial(_refitted, method=method, ranks=ranks, refit=refit,
                                         bias_correction=bias_correction)
            chain = fit_through_activation(layer, chain, stats, *samples, activation, refitted, chain_kernel).chain
    except (NumericalError, np.linalg.LinAlgError) as exc:
        return Plan(method.name, ranks, skip_reason=f"{method.name} failed numerically: {exc}")
    if isinstance(chain, Chain):
        chain = flush_subnormals(chain)
    macs, params = chain_costs(chain, layer)
    return Plan(method.name, chain.ranks, chain, macs, params,
                relative_error(layer.weight.astype(np.float64), chain_kernel(layer, chain)))


def _fitted(layer: Layer, method: Method, ranks, factor_stats, stats, refit: bool, bias_correction: bool):
    """The method's chain, its last stage refit and bias shifted on `stats` when given."""
    chain = method.build(layer, ranks, factor_stats)
    if stats is not None and (refit or bias_correction):
        chain = refit_chain(layer, chain, stats, refit, bias_correction)
    return chain


def _refitted(layer: Layer, moments, *, method: Method, ranks, refit: bool, bias_correction: bool):
    """`_fitted` on dense `moments` (the activation-aware step's fit of its auxiliary target)."""
    return _fitted(layer, method, ranks, moments, moments, refit, bias_correction)


def refit_chain(layer: Layer, chain: Chain, moments, refit: bool, bias_correction: bool) -> Chain:
    """The chain with its last stage refit by least squares against the original output and the
    bias shifted by the remaining mean output difference (`factorize.refit.refit_chain` /
    `refit_matrix`; ridge `RIDGE` plus the moments' shrinkage)."""
    stages = list(chain.stages)
    ridge = RIDGE + shrinkage(moments)
    if layer.op in ("Gemm", "MatMul"):
        if layer.weight_side == "left":
            return chain  # W·X: a refit would need the output's columns; left as fitted
        # MatMul has no bias input to shift; Gemm with beta = 0 ignores C.
        with_bias = bias_correction and layer.op == "Gemm" and layer.gemm.beta != 0
        last, delta = refits.refit_matrix(layer.matrix(), stages[0].weight, moments, ridge=ridge, refit=refit,
                                        Q=stages[-1].weight, with_bias=with_bias)
    else:
        with_bias = bias_correction
        convs, orders = _conv_stages(chain)
        last, delta = refits.refit_chain([s.weight for s in convs], [s.group for s in convs], convs[-1].group,
                                       layer.conv.group, moments, layer.weight, input_orders=orders, ridge=ridge,
                                       refit=refit, with_bias=with_bias)
        last = last.reshape(convs[-1].weight.shape)
    stages[-1] = dataclasses.replace(stages[-1], weight=np.asarray(last, dtype=np.float32))
    bias = _shifted_bias(layer, delta) if with_bias else chain.bias
    return dataclasses.replace(chain, stages=tuple(stages), bias=bias)


def _shifted_bias(layer: Layer, delta: np.ndarray) -> np.ndarray:
    """The last node's new bias: the original plus the mean output difference.

    Gemm computes `alpha·A·B + beta·C`, and `delta` is in units of `A·B`: C moves by
    `alpha·delta/beta`.
    """
    base = layer.bias.astype(np.float64) if layer.bias is not None else np.zeros(delta.shape)
    if layer.op == "Gemm":
        delta = layer.gemm.alpha * delta / layer.gemm.beta
    return (base + delta).astype(np.float32)


def _conv_stages(chain: Chain) -> tuple[list[ConvStage], list[np.ndarray | None]]:
    """The chain's Conv stages and, per stage, the channel order a shuffle before it imposes
    (input channel c reads the previous output channel `order[c]`; None: identity)."""
    convs, orders, shuffle = [], [], None
    for stage in chain.stages:
        if isinstance(stage, ShuffleStage):
            shuffle = _shuffle_order(stage)
        else:
            convs.append(stage)
            orders.append(shuffle)
            shuffle = None
    return convs, orders


def _shuffle_order(stage: ShuffleStage) -> np.ndarray:
    """Channel c after the shuffle reads channel order[c] before it: `(i, j, q) <- (j, i, q)`."""
    a, b, r = stage.inner, stage.outer, stage.per
    return np.arange(b * a * r).reshape(b, a, r).transpose(1, 0, 2).reshape(-1)


def chain_kernel(layer: Layer, chain: Chain | VersatileChain) -> np.ndarray:
    """The single weight the chain computes, in the layer's own weight layout (float64).

    Conv chains compose stage by stage (`factorize.compose_chain`: stride-1 cross-correlations
    compose into one kernel; the tiled shuffle is a channel permutation); matrix chains multiply.
    """
    if layer.op in ("Gemm", "MatMul"):
        first, second = (stage.weight.astype(np.float64) for stage in chain.stages)
        matrix = second @ first if layer.weight_side == "left" else first @ second
        return matrix.T if layer.op == "Gemm" and layer.gemm.trans_b else matrix
    if isinstance(chain, VersatileChain):
        return chain.factors.to_tensor().astype(np.float64)
    if layer.op == "ConvTranspose":
        return _transpose_kernel(layer, chain)
    convs, orders = _conv_stages(chain)
    return factorize.compose_chain([s.weight.astype(np.float64) for s in convs], [s.group for s in convs],
                                   groups=layer.conv.group, input_orders=orders)


def _transpose_kernel(layer: Layer, chain: Chain) -> np.ndarray:
    """`W[s, t, k] = Σ P[r, s] F[r, q, k] (U[t, q])` per group, from a ConvTranspose chain."""
    g = layer.conv.group
    first, middle, *last = (stage.weight.astype(np.float64) for stage in chain.stages)
    r = first.shape[0] // g
    p = first.reshape(g, r, -1)
    f = middle.reshape(g, r, *middle.shape[1:])
    kernel = np.einsum("grs,grq...->gsq...", p, f)
    if last:
        u = last[0].reshape(g, -1, last[0].shape[1])
        kernel = np.einsum("gsq...,gtq->gst...", kernel, u)
    return kernel.reshape(-1, *kernel.shape[2:])
