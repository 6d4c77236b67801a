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
from onnx_lowrank.factorize.cp import max_cp_rank
from onnx_lowrank.graph import Layer
from onnx_lowrank.ranks import ModeSpectrum
from onnx_lowrank.rewrite.chain import (
    Chain, ConvStage, MatMulStage, ShuffleStage, VersatileChain, chain_costs, flush_subnormals,
)

__all__ = ["METHOD_NAMES", "DataFit", "Plan", "chain_kernel", "chain_template", "data_spectra", "full_ranks", "mode_spectra", "not_applicable",
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


VERSATILE = ("versatile", "versatile-channel")


def resolved_method(layer: Layer, method: str) -> str:
    """The method actually used: "svd" for matrix layers and pointwise convolutions; a
    ConvTranspose takes "tucker2" for every method but "svd" (its two exact rewrites)."""
    if layer.op in ("Gemm", "MatMul") or _is_pointwise(layer):
        return "svd"
    if method in VERSATILE:
        return method
    if layer.op == "ConvTranspose" and method != "svd":
        return "tucker2"
    return method


def _swap_channels(weight: np.ndarray, groups: int) -> np.ndarray:
    """`[g·A, B, k..]` -> `[g·B, A, k..]`, swapping the two channel axes within each group:
    a ConvTranspose weight `[S, T/g, k..]` becomes the Conv-layout `[T, S/g, k..]` and back."""
    a, b = weight.shape[0] // groups, weight.shape[1]
    blocks = weight.reshape(groups, a, b, *weight.shape[2:])
    return np.ascontiguousarray(np.swapaxes(blocks, 1, 2).reshape(groups * b, a, *weight.shape[2:]))


def _conv_layout(layer: Layer) -> np.ndarray:
    """The layer's kernel as `[T, S/g, k..]` (a ConvTranspose's channel axes swapped per group)."""
    return _swap_channels(layer.weight, layer.conv.group) if layer.op == "ConvTranspose" else layer.weight


def full_ranks(layer: Layer, method: str, tiles: tuple[int, int] = (2, 2)) -> tuple[int, ...]:
    """The ranks at which `method` reproduces the layer exactly (per group; CP: a reference rank).

    svd: `min(T/g, (S/g)·Πk)` (matrix: `min(K, N)`); spatial-svd: `min((S/g)·kh, (T/g)·kw)`;
    tiled-svd: `min(T/a, (S/b)·Πk)` per tile; tucker2: `(T/g, S/g)`; cp and cp-depthwise have
    no exact finite rank in general, so their reference is `max(T/g, S/g)`, capped at the
    largest rank the factorizer accepts (`max_cp_rank`).
    """
    method = resolved_method(layer, method)
    if layer.op in ("Gemm", "MatMul"):
        return (min(layer.matrix().shape),)
    if layer.op == "ConvTranspose" and method == "svd":
        s, t_g, *kernel = layer.weight.shape
        return (min(s // layer.conv.group, t_g * math.prod(kernel)),)
    t, s_g, *kernel = _conv_layout(layer).shape
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
    bound = max_cp_rank(layer.weight.shape, layer.conv.group, flatten=method == "cp-depthwise")
    return (min(max(t_g, s_g), bound),)


def not_applicable(layer: Layer, method: str, tiles: tuple[int, int] = (2, 2)) -> str | None:
    """Why `method` cannot serve `layer`, or None."""
    method = resolved_method(layer, method)
    if method not in METHOD_NAMES:
        return f"unknown method {method}"
    if method in VERSATILE:
        from onnx_lowrank.rewrite import versatile

        return (versatile.spatial_versatile_reason(layer) if method == "versatile"
                else versatile.channel_versatile_reason(layer))
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
    g = layer.conv.group
    if layer.op == "ConvTranspose":
        return Chain(method, ranks, _transpose_stages(layer, method, ranks))
    t, s_g, *kernel = layer.weight.shape
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


def _transpose_stages(layer: Layer, method: str, ranks: tuple[int, ...]) -> tuple[ConvStage, ...]:
    """ConvTranspose chains, mirroring the Conv ones: pointwise convs at the input resolution
    and/or the output resolution around one ConvTranspose carrying the original geometry.

    svd: `W[s, (t, k)] ≈ Σ_r P[s, r] F[r, t, k]` -> Conv1x1 `[g·r, S/g, 1..]`, ConvTranspose
    `[g·r, T/g, k..]`. tucker2: `W[s, t, k] ≈ Σ V[s, rs] G[rs, rt, k] U[t, rt]` -> Conv1x1
    `[g·Rs, S/g, 1..]`, ConvTranspose `[g·Rs, Rt, k..]`, Conv1x1 `[T, Rt, 1..]`.
    """
    s, t_g, *kernel = layer.weight.shape
    g = layer.conv.group
    ones = [1] * len(kernel)
    if method == "svd":
        (r,) = ranks
        return (ConvStage(_placeholder(g * r, s // g, *ones), g, "point"),
                ConvStage(_placeholder(g * r, t_g, *kernel), g, "full", transpose=True))
    rt, rs = ranks
    return (ConvStage(_placeholder(g * rs, s // g, *ones), g, "point"),
            ConvStage(_placeholder(g * rs, rt, *kernel), g, "full", transpose=True),
            ConvStage(_placeholder(t_g * g, rt, *ones), g, "point"))


def mode_spectra(layer: Layer, method: str, tiles: tuple[int, int] = (2, 2)) -> tuple[ModeSpectrum, ...]:
    """Per factorized mode (as in `full_ranks`), the singular values it truncates, per group.

    CP has no spectrum of its own; its single mode reports the Tucker output-mode spectrum, a
    proxy (a rank-R CP is a Tucker-(R, R) with a diagonal core, so its error is no smaller).
    """
    method = resolved_method(layer, method)
    if layer.op in ("Gemm", "MatMul"):
        return (ModeSpectrum(tuple(spectra.matrix_spectrum(layer.matrix())), layer.matrix().shape),)
    weight, g = _conv_layout(layer), layer.conv.group
    if layer.op == "ConvTranspose" and method == "svd":
        s, t_g, *kernel = layer.weight.shape
        return (ModeSpectrum(tuple(spectra.lowered_spectra(layer.weight, g)), (s // g, t_g * math.prod(kernel))),)
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


#: Ridge of the least-squares refit, relative to the mean variance (data-aware.md: 1e-3 worked).
RIDGE = 1e-3


def shrinkage(moments) -> float:
    """Regularisation of the input second moment `Σ + ε·(tr Σ / D)·I`, `ε = 1e-6 + D / n`.

    With n input vectors of dimension D, Σ estimated from fewer vectors than dimensions is
    rank-deficient and a whitened fit would ignore every direction the calibration set missed;
    shrinking towards the identity (weight-only fitting) in proportion to D/n keeps a small
    calibration set from doing worse than no calibration at all (Ledoit–Wolf-style shrinkage).
    """
    return 1e-6 + moments.dim / max(moments.n, 1)


@dataclasses.dataclass(frozen=True)
class DataFit:
    """How to use calibration statistics: `moments` of the layer's input vectors (see
    `factorize.data.Moments`), and whether to refit the last factor and correct the bias."""

    moments: object
    refit: bool = True
    bias_correction: bool = True


def data_spectra(layer: Layer, method: str, moments, tiles: tuple[int, int] = (2, 2)) -> tuple[ModeSpectrum, ...]:
    """`mode_spectra` measured in OUTPUT units on calibration data: the singular values of the
    whitened weight `W·L` (`L Lᵀ` the input second moment), whose discarded energy is the
    layer's relative output error (SVD-LLM). Tucker-2's output mode is the spectrum of the output
    second moment; its input mode keeps the weight spectrum (a heuristic for the budget only).
    ConvTranspose layers, fit on weights only, keep their weight spectra.
    """
    from onnx_lowrank.factorize import data

    method = resolved_method(layer, method)
    weight_spectra = mode_spectra(layer, method, tiles)
    if layer.op == "ConvTranspose":
        return weight_spectra
    if layer.op in ("Gemm", "MatMul"):
        return (_with_values(weight_spectra[0], (_whitened_matrix(layer, moments, 1)[2],)),)
    weight, g = layer.weight, layer.conv.group
    if method == "spatial-svd":
        values = data.whitened_spatial_svd(weight, g, 1, moments, eps=shrinkage(moments)).singular_values
    elif method == "tiled-svd":
        values = tuple(v for row in data.whitened_tiled_svd(weight, tiles, 1, moments, eps=shrinkage(moments)).singular_values for v in row)
    elif method == "tucker2":
        fitted = data.data_tucker2(weight, g, (1, 1), moments, eps=shrinkage(moments)).mode_spectra
        return (_with_values(weight_spectra[0], tuple(out for out, _ in fitted)), weight_spectra[1])
    else:
        values = data.whitened_channel_svd(weight, g, 1, moments, eps=shrinkage(moments)).singular_values
    return (_with_values(weight_spectra[0], tuple(values)),)


def _with_values(spectrum: ModeSpectrum, values: tuple[np.ndarray, ...]) -> ModeSpectrum:
    """`spectrum` with other singular values; beyond min(L, M) they are zero (rank deficiency)."""
    limit = min(spectrum.shape)
    return ModeSpectrum(tuple(np.asarray(v)[:limit] for v in values), spectrum.shape)


def plan(layer: Layer, method: str, policy, tiles: tuple[int, int] = (2, 2), seed: int = 0,
         ranks: tuple[int, ...] | None = None, data: DataFit | None = None) -> Plan:
    """Factorize `layer` with `method` at `ranks` (or the ranks `policy` picks) and build its chain.

    With `data`, the factorization minimises the layer's OUTPUT error on the calibration inputs
    (whitened SVDs, data-driven Tucker-2), then the last factor is refit by least squares against
    the original layer's output and the bias shifted by the remaining mean difference. Subnormal
    weights are flushed to zero (`flush_subnormals`: slow on CPUs, numerically nothing).
    """
    method = resolved_method(layer, method)
    reason = not_applicable(layer, method, tiles)
    if reason is not None:
        return Plan(method, skip_reason=reason)
    if method in VERSATILE:
        return _versatile_plan(layer, method)
    if ranks is None:
        spectra_needed = getattr(policy, "uses_spectra", True)
        ranks = policy.ranks(full_ranks(layer, method, tiles),
                             mode_spectra(layer, method, tiles) if spectra_needed else None)
    try:
        factors = _factorize(layer, method, ranks, tiles, seed, data)
    except ValueError as exc:
        return Plan(method, ranks, skip_reason=str(exc))
    chain = _filled(chain_template(layer, method, ranks, tiles), factors.weights)
    if data is not None and layer.op != "ConvTranspose" and (data.refit or data.bias_correction):
        chain = _refit(layer, chain, factors, data, tiles)
    chain = flush_subnormals(chain)
    macs, params = chain_costs(chain, layer)
    return Plan(method, ranks, chain, macs, params, _weight_error(layer, chain, factors))


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


def _factorize(layer: Layer, method: str, ranks: tuple[int, ...], tiles, seed: int, data: DataFit | None):
    if data is not None:
        fitted = _factorize_with_data(layer, method, ranks, tiles, data.moments)
        if fitted is not None:
            return fitted
    if layer.op in ("Gemm", "MatMul"):
        factors = factorize.truncated_svd(layer.matrix(), ranks[0])
        return _MatrixWeights(factors.left, factors.right, layer.weight_side, factors.rel_error)
    weight, group = layer.weight, layer.conv.group
    if layer.op == "ConvTranspose":
        return _transpose_factors(layer, method, ranks)
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
class _TransposeWeights:
    """A ConvTranspose factorization's stage weights in chain order."""

    weights: tuple[np.ndarray, ...]
    rel_error: float


def _transpose_factors(layer: Layer, method: str, ranks) -> _TransposeWeights:
    """Factor a ConvTranspose weight with the Conv factorizations, reading its channel axes
    swapped (`_swap_channels`), and lay the factors out as `_transpose_stages` expects."""
    g = layer.conv.group
    if method == "svd":
        factors = factorize.channel_svd(layer.weight, ranks[0], groups=g)
        kernel_part, channel_part = factors.weights
        return _TransposeWeights((_swap_channels(channel_part, g), kernel_part), factors.rel_error)
    factors = factorize.tucker2(_conv_layout(layer), ranks, groups=g)
    first, core, last = factors.weights
    return _TransposeWeights((first, _swap_channels(core, g), last), factors.rel_error)


def _factorize_with_data(layer: Layer, method: str, ranks, tiles, moments):
    """The data-aware factorization of `method`, or None where only the refit applies (CP)."""
    from onnx_lowrank.factorize import data

    if layer.op == "ConvTranspose":
        return None
    if layer.op in ("Gemm", "MatMul"):
        a, b, _ = _whitened_matrix(layer, moments, ranks[0])
        left, right = (a, b) if layer.weight_side == "left" else (b.T, a.T)
        return _MatrixWeights(left, right, layer.weight_side, _relative(layer.matrix(), left @ right))
    weight, group = layer.weight, layer.conv.group
    if method == "svd":
        return data.whitened_channel_svd(weight, group, ranks[0], moments, eps=shrinkage(moments))
    if method == "spatial-svd":
        return data.whitened_spatial_svd(weight, group, ranks[0], moments, eps=shrinkage(moments))
    if method == "tiled-svd":
        return data.whitened_tiled_svd(weight, tiles, ranks[0], moments, eps=shrinkage(moments))
    if method == "tucker2":
        return data.data_tucker2(weight, group, ranks, moments, eps=shrinkage(moments))
    return None


def _versatile_plan(layer: Layer, method: str) -> Plan:
    """Versatile filters fitted to the trained kernel (Wang et al., NeurIPS 2018): spatial
    (ceil(d/2) nested masks of one primary per group of filters) or channel (a primary of S/2
    channels sliding with stride S/2). Weight-only; no rank: the structure fixes the cost."""
    from onnx_lowrank.factorize import versatile

    try:
        if method == "versatile":
            factors = versatile.spatial_versatile(layer.weight, layer.conv.group)
        else:
            half = layer.weight.shape[1] // 2
            factors = versatile.channel_versatile(layer.weight, half, half)
    except ValueError as exc:
        return Plan(method, skip_reason=str(exc))
    chain = VersatileChain(method, tuple(factors.ranks), factors)
    macs, params = chain_costs(chain, layer)
    bias = 0 if layer.bias is None else layer.bias.size
    return Plan(method, chain.ranks, chain, macs, params + bias, float(factors.rel_error))


def _whitened_matrix(layer: Layer, moments, rank: int):
    """Whitened SVD `(A, B, singular values)` of a Gemm/MatMul weight as the map `y = W_rows · x`.

    A weight on the right (`x·W`) maps rows through `Wᵀ`; a weight on the left (`W·X`) maps
    the columns of X through W.
    """
    from onnx_lowrank.factorize import data

    matrix = layer.matrix()
    lowered = matrix if layer.weight_side == "left" else matrix.T
    eps = shrinkage(moments)
    sigma, target = data.target_and_sigma(lowered, moments, 0, eps=eps)
    return data.whitened_svd(lowered, sigma, rank, target=target, eps=eps)


def _refit(layer: Layer, chain: Chain, factors, data_fit: DataFit, tiles) -> Chain:
    """Least-squares refit of the last stage against the original output, and the bias shift."""
    from onnx_lowrank.factorize import data

    moments = data_fit.moments
    stages = list(chain.stages)
    if layer.op in ("Gemm", "MatMul"):
        if layer.weight_side == "left":
            return chain  # W·X: a refit would need the output's columns; left as fitted
        # MatMul has no bias input to shift; Gemm with beta = 0 ignores C.
        with_bias = data_fit.bias_correction and layer.op == "Gemm" and layer.gemm.beta != 0
        last, delta = data.refit_matrix(layer.matrix(), stages[0].weight, moments, ridge=RIDGE + shrinkage(moments),
                                        refit=data_fit.refit, Q=stages[-1].weight,
                                        with_bias=with_bias)
    else:
        with_bias = data_fit.bias_correction
        convs = [s for s in stages if isinstance(s, ConvStage)]
        orders = [None] * len(convs)
        if isinstance(factors, factorize.TiledSVDFactors) and factors.needs_shuffle:
            orders[-1] = factors.shuffle_order
        last, delta = data.refit_chain([s.weight for s in convs], [s.group for s in convs],
                                       convs[-1].group, layer.conv.group, moments, layer.weight,
                                       input_orders=orders, ridge=RIDGE + shrinkage(moments),
                                       refit=data_fit.refit, with_bias=with_bias)
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


def _weight_error(layer: Layer, chain: Chain, factors) -> float:
    """Relative error of the chain's effective weight against the layer's (a refit changes it)."""
    return _relative(layer.weight.astype(np.float64), chain_kernel(layer, chain))


def chain_kernel(layer: Layer, chain: Chain) -> np.ndarray:
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
    convs, orders, shuffle = [], [], None
    for stage in chain.stages:
        if isinstance(stage, ShuffleStage):
            shuffle = _shuffle_order(stage)
        else:
            convs.append(stage)
            orders.append(shuffle)
            shuffle = None
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


def _shuffle_order(stage: ShuffleStage) -> np.ndarray:
    """Channel c after the shuffle reads channel order[c] before it: `(i, j, q) <- (j, i, q)`."""
    a, b, r = stage.inner, stage.outer, stage.per
    return np.arange(b * a * r).reshape(b, a, r).transpose(1, 0, 2).reshape(-1)


def _relative(reference: np.ndarray, approx: np.ndarray) -> float:
    norm = np.linalg.norm(reference)
    return float(np.linalg.norm(reference - approx) / norm) if norm > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class _MatrixWeights:
    """A matrix factorization's weights in chain order: `x·P·Q`, or `P·(Q·x)` for a left weight."""

    left: np.ndarray
    right: np.ndarray
    side: str
    rel_error: float

    @property
    def weights(self) -> tuple[np.ndarray, ...]:
        return (self.right, self.left) if self.side == "left" else (self.left, self.right)
