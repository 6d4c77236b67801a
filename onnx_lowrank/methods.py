"""The methods: which factorization serves a layer, its full ranks, its chain and its spectra.

This is the one place that joins `factorize/` (numbers) and `rewrite/` (nodes). Matrix layers
(Gemm, MatMul) and pointwise convolutions are factorized by truncated SVD whatever the method:
Tucker-2 or CP of a matrix is an SVD with extra nodes.

The geometry of each method's chain (stage weight shapes, groups, roles) is written once, in
`chain_template`; costing a rank needs only the template (zero-memory placeholder weights),
and a factorization fills the template's weights.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnx_lowrank import factorize
from onnx_lowrank.config import METHOD_NAMES
from onnx_lowrank.factorize import spectra
from onnx_lowrank.graph import Layer
from onnx_lowrank.ranks import ModeSpectrum
from onnx_lowrank.rewrite.chain import Chain, ConvStage, MatMulStage, ShuffleStage, chain_costs

__all__ = ["METHOD_NAMES", "Plan", "chain_template", "full_ranks", "mode_spectra", "not_applicable",
           "plan", "resolved_method"]


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


def not_applicable(layer: Layer, method: str, tiles: tuple[int, int] = (2, 2)) -> str | None:
    """Why `method` cannot serve `layer`, or None."""
    method = resolved_method(layer, method)
    if method not in METHOD_NAMES:
        return f"unknown method {method}"
    if method == "spatial-svd" and layer.weight.ndim != 4:
        return f"spatial SVD needs a 2-D kernel; this one is {layer.weight.ndim - 2}-D"
    if method == "tiled-svd":
        if layer.conv.group != 1:
            return f"tiled SVD needs an ungrouped convolution; this one has {layer.conv.group} groups"
        t, s = layer.weight.shape[:2]
        if t % tiles[0] or s % tiles[1]:
            return (f"tiled SVD: {tiles[0]}x{tiles[1]} tiles do not divide {t} output and {s} input "
                    "channels; no channel may be dropped")
    return None


def _placeholder(*shape: int) -> np.ndarray:
    return np.broadcast_to(np.float32(0), shape)


def chain_template(layer: Layer, method: str, ranks: tuple[int, ...],
                   tiles: tuple[int, int] = (2, 2)) -> Chain:
    """The chain `method` builds at `ranks`, with zero-memory placeholder weights.

    Stage shapes per method (r, R per group; g the original groups; `1..` ones for each spatial dim):
    svd `[g·r, S/g, k..]` full, `[T, r, 1..]`; spatial-svd `[g·r, S/g, kh, 1]` along H,
    `[T, r, 1, kw]` along W; tiled-svd `[b·a·r, S/b, k..]` (groups b), shuffle, `[T, b·r, 1..]`
    (groups a); tucker2 `[g·Rs, S/g, 1..]`, `[g·Rt, Rs, k..]` full, `[T, Rt, 1..]`; cp
    `[g·R, S/g, 1..]`, one depthwise `[g·R, 1, .., k_n, ..]` per spatial dim, `[T, R, 1..]`;
    cp-depthwise the same with one depthwise `[g·R, 1, k..]`; matrices `[K, r]`, `[r, N]`.
    """
    method = resolved_method(layer, method)
    if layer.op in ("Gemm", "MatMul"):
        (r,) = ranks
        rows, cols = layer.matrix().shape
        if layer.weight_side == "left":
            stages = (MatMulStage(_placeholder(r, cols), "left"), MatMulStage(_placeholder(rows, r), "left"))
        else:
            stages = (MatMulStage(_placeholder(rows, r)), MatMulStage(_placeholder(r, cols)))
        return Chain(method, ranks, stages)
    t, s_g, *kernel = layer.weight.shape
    g = layer.conv.group
    ones = [1] * len(kernel)
    if method in ("svd", "spatial-svd"):
        (r,) = ranks
        if method == "svd":
            stages = (ConvStage(_placeholder(g * r, s_g, *kernel), g, "full"),
                      ConvStage(_placeholder(t, r, *ones), g, "point"))
        else:
            stages = (ConvStage(_placeholder(g * r, s_g, kernel[0], 1), g, "axis", 0),
                      ConvStage(_placeholder(t, r, 1, kernel[1]), g, "axis", 1))
    elif method == "tiled-svd":
        (r,) = ranks
        a, b = tiles
        stages = (ConvStage(_placeholder(b * a * r, s_g // b, *kernel), b, "full"),
                  *((ShuffleStage(outer=b, inner=a, per=r),) if a > 1 and b > 1 else ()),
                  ConvStage(_placeholder(t, b * r, *ones), a, "point"))
    elif method == "tucker2":
        rt, rs = ranks
        stages = (ConvStage(_placeholder(g * rs, s_g, *ones), g, "point"),
                  ConvStage(_placeholder(g * rt, rs, *kernel), g, "full"),
                  ConvStage(_placeholder(t, rt, *ones), g, "point"))
    else:
        (r,) = ranks
        if method == "cp":
            depthwise = tuple(
                ConvStage(_placeholder(g * r, 1, *[k if i == d else 1 for i, k in enumerate(kernel)]),
                          g * r, "axis", d) for d in range(len(kernel)))
        else:
            depthwise = (ConvStage(_placeholder(g * r, 1, *kernel), g * r, "full"),)
        stages = (ConvStage(_placeholder(g * r, s_g, *ones), g, "point"), *depthwise,
                  ConvStage(_placeholder(t, r, *ones), g, "point"))
    return Chain(method, ranks, stages)


def mode_spectra(layer: Layer, method: str, tiles: tuple[int, int] = (2, 2)) -> tuple[ModeSpectrum, ...]:
    """Per factorized mode (as in `full_ranks`), the singular values it truncates, per group.

    CP has no spectrum of its own; its single mode reports the Tucker output-mode spectrum, a
    proxy (a rank-R CP is a Tucker-(R, R) with a diagonal core, so its error is no smaller).
    """
    method = resolved_method(layer, method)
    if layer.op in ("Gemm", "MatMul"):
        return (ModeSpectrum(tuple(spectra.matrix_spectrum(layer.matrix())), layer.matrix().shape),)
    weight, g = layer.weight, layer.conv.group
    t, s_g, *kernel = weight.shape
    t_g, taps = t // g, math.prod(kernel)
    if method == "spatial-svd":
        return (ModeSpectrum(tuple(spectra.spatial_spectra(weight, g)), (s_g * kernel[0], t_g * kernel[1])),)
    if method == "tiled-svd":
        a, b = tiles
        return (ModeSpectrum(tuple(spectra.tile_spectra(weight, tiles)), (t // a, s_g // b * taps)),)
    output_mode = ModeSpectrum(tuple(spectra.lowered_spectra(weight, g)), (t_g, s_g * taps))
    if method == "tucker2":
        return (output_mode, ModeSpectrum(tuple(spectra.input_mode_spectra(weight, g)), (s_g, t_g * taps)))
    return (output_mode,)


def plan(layer: Layer, method: str, policy, tiles: tuple[int, int] = (2, 2), seed: int = 0,
         ranks: tuple[int, ...] | None = None) -> Plan:
    """Factorize `layer` with `method` at `ranks` (or the ranks `policy` picks) and build its chain."""
    method = resolved_method(layer, method)
    reason = not_applicable(layer, method, tiles)
    if reason is not None:
        return Plan(method, skip_reason=reason)
    if ranks is None:
        spectra_needed = getattr(policy, "uses_spectra", True)
        ranks = policy.ranks(full_ranks(layer, method, tiles),
                             mode_spectra(layer, method, tiles) if spectra_needed else None)
    try:
        factors = _factorize(layer, method, ranks, tiles, seed)
    except ValueError as exc:
        return Plan(method, ranks, skip_reason=str(exc))
    chain = _filled(chain_template(layer, method, ranks, tiles), factors.weights)
    macs, params = chain_costs(chain, layer)
    return Plan(method, ranks, chain, macs, params, float(factors.rel_error))


def _filled(template: Chain, weights: tuple[np.ndarray, ...]) -> Chain:
    weighted = iter(weights)
    stages = []
    for stage in template.stages:
        if isinstance(stage, ShuffleStage):
            stages.append(stage)
            continue
        weight = next(weighted)
        if weight.shape != stage.weight.shape:
            raise AssertionError(f"{template.method}: factor of shape {weight.shape} where the chain "
                                 f"expects {stage.weight.shape}")
        stages.append(dataclasses.replace(stage, weight=weight))
    return dataclasses.replace(template, stages=tuple(stages))


def _factorize(layer: Layer, method: str, ranks: tuple[int, ...], tiles, seed: int):
    if layer.op in ("Gemm", "MatMul"):
        factors = factorize.truncated_svd(layer.matrix(), ranks[0])
        return _MatrixWeights(factors, layer.weight_side)
    weight, group = layer.weight, layer.conv.group
    if method == "svd":
        return factorize.channel_svd(weight, ranks[0], groups=group)
    if method == "spatial-svd":
        return factorize.spatial_svd(weight, ranks[0], groups=group)
    if method == "tiled-svd":
        return factorize.tiled_svd(weight, tiles, ranks[0])
    if method == "tucker2":
        return factorize.tucker2(weight, ranks, groups=group)
    if method == "cp":
        return factorize.cp(weight, ranks[0], groups=group, seed=seed)
    return factorize.cp_depthwise(weight, ranks[0], groups=group, seed=seed)


@dataclasses.dataclass(frozen=True)
class _MatrixWeights:
    """A matrix factorization's weights in chain order: `x·P·Q`, or `P·(Q·x)` for a left weight."""

    factors: object
    side: str

    @property
    def weights(self) -> tuple[np.ndarray, ...]:
        left, right = self.factors.left, self.factors.right
        return (right, left) if self.side == "left" else (left, right)

    @property
    def rel_error(self) -> float:
        return self.factors.rel_error
