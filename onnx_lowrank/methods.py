"""The methods: which factorization serves a layer, its full ranks, and the chain it becomes.

This is the one place that joins `factorize/` (numbers) and `rewrite/` (nodes). Matrix layers
(Gemm, MatMul) and pointwise convolutions are factorized by truncated SVD whatever the method:
Tucker-2 or CP of a matrix is an SVD with extra nodes.
"""

from __future__ import annotations

import dataclasses
import math

from onnx_lowrank import factorize
from onnx_lowrank.config import METHOD_NAMES
from onnx_lowrank.graph import Layer
from onnx_lowrank.rewrite.chain import Chain, ConvStage, MatMulStage, ShuffleStage, chain_costs

__all__ = ["METHOD_NAMES", "Plan", "full_ranks", "plan", "resolved_method"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """A layer's factorization under one method: the chain, its cost, or why there is none."""

    method: str
    ranks: tuple[int, ...] | None = None
    chain: Chain | None = None
    macs: int | None = None
    params: int | None = None
    weight_rel_error: float | None = None
    skip_reason: str | None = None


def _is_pointwise(layer: Layer) -> bool:
    return layer.op == "Conv" and all(k == 1 for k in layer.weight.shape[2:])


def resolved_method(layer: Layer, method: str) -> str:
    """The method actually used: "svd" for matrix layers and pointwise convolutions."""
    if layer.op in ("Gemm", "MatMul") or _is_pointwise(layer):
        return "svd"
    return method


def full_ranks(layer: Layer, method: str, tiles: tuple[int, int] = (2, 2)) -> tuple[int, ...]:
    """The ranks at which `method` reproduces the layer exactly (per group; CP: a reference rank).

    svd: `min(T/g, (S/g)·Πk)` (matrix: `min(K, N)`); spatial-svd: `min((S/g)·kh, (T/g)·kw)`;
    tiled-svd: `min(T/a, (S/b)·Πk)` per tile; tucker2: `(T/g, S/g)`; cp and cp-depthwise have
    no exact finite rank in general, so their reference is `max(T/g, S/g)`.
    """
    method = resolved_method(layer, method)
    if layer.op in ("Gemm", "MatMul"):
        return (min(layer.matrix().shape),)
    t, s_g, *kernel = layer.weight.shape
    t_g = t // layer.conv.group
    if method == "svd":
        return (min(t_g, s_g * math.prod(kernel)),)
    if method == "spatial-svd":
        return (min(s_g * kernel[0], t_g * kernel[1]),)
    if method == "tiled-svd":
        a, b = tiles
        return (max(1, min(t // a, s_g // b * math.prod(kernel))),)
    if method == "tucker2":
        return (t_g, s_g)
    return (max(t_g, s_g),)


def plan(layer: Layer, method: str, policy, tiles: tuple[int, int] = (2, 2), seed: int = 0) -> Plan:
    """Factorize `layer` with `method` at the ranks `policy` picks and build its chain."""
    method = resolved_method(layer, method)
    reason = _not_applicable(layer, method)
    if reason is not None:
        return Plan(method, skip_reason=reason)
    ranks = policy.ranks(full_ranks(layer, method, tiles))
    try:
        factors, stages = _factor_stages(layer, method, ranks, tiles, seed)
    except ValueError as exc:
        return Plan(method, ranks, skip_reason=str(exc))
    chain = Chain(method, ranks, tuple(stages))
    macs, params = chain_costs(chain, layer)
    return Plan(method, ranks, chain, macs, params, float(factors.rel_error))


def _not_applicable(layer: Layer, method: str) -> str | None:
    if method not in METHOD_NAMES:
        return f"unknown method {method}"
    if method == "spatial-svd" and layer.weight.ndim != 4:
        return f"spatial SVD needs a 2-D kernel; this one is {layer.weight.ndim - 2}-D"
    if method == "tiled-svd" and layer.conv.group != 1:
        return f"tiled SVD needs an ungrouped convolution; this one has {layer.conv.group} groups"
    return None


def _factor_stages(layer: Layer, method: str, ranks: tuple[int, ...], tiles, seed: int):
    if layer.op in ("Gemm", "MatMul"):
        factors = factorize.truncated_svd(layer.matrix(), ranks[0])
        left, right = factors.left, factors.right
        if layer.weight_side == "left":
            return factors, [MatMulStage(right, "left"), MatMulStage(left, "left")]
        return factors, [MatMulStage(left), MatMulStage(right)]
    weight, group = layer.weight, layer.conv.group
    n = weight.ndim - 2
    if method == "svd":
        factors = factorize.channel_svd(weight, ranks[0], groups=group)
        roles = [("full",), ("point",)]
    elif method == "spatial-svd":
        factors = factorize.spatial_svd(weight, ranks[0], groups=group)
        roles = [("axis", 0), ("axis", 1)]
    elif method == "tiled-svd":
        factors = factorize.tiled_svd(weight, tiles, ranks[0])
        first, second = factors.weights
        stages = [ConvStage(first, factors.groups_per_stage[0], "full")]
        if factors.needs_shuffle:
            stages.append(ShuffleStage(outer=tiles[1], inner=tiles[0], per=ranks[0]))
        stages.append(ConvStage(second, factors.groups_per_stage[1], "point"))
        return factors, stages
    elif method == "tucker2":
        factors = factorize.tucker2(weight, ranks, groups=group)
        roles = [("point",), ("full",), ("point",)]
    elif method == "cp":
        factors = factorize.cp(weight, ranks[0], groups=group, seed=seed)
        roles = [("point",), *[("axis", d) for d in range(n)], ("point",)]
    else:
        factors = factorize.cp_depthwise(weight, ranks[0], groups=group, seed=seed)
        roles = [("point",), ("full",), ("point",)]
    stages = [ConvStage(w, g, *role) for w, g, role in
              zip(factors.weights, factors.groups_per_stage, roles, strict=True)]
    return factors, stages
