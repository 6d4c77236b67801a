"""A layer's truncation error, as the perturbation that measures its output gain (`--gain-noise truncation`).

For a layer ``y = Wx`` (bias excluded) with input second moments ``C = E[xxᵀ] = LLᵀ``, the
data-aware rank-r approximation is ``W_r = U_r U_rᵀ W``, ``U_r`` the leading left singular
vectors of ``WL`` (whitened SVD, as `passes.statistics` reads its spectra). Those are the
leading eigenvectors of the output second moments ``E[yyᵀ] = W C Wᵀ``, so the truncation error

    y - W_r x = (I - U_r U_rᵀ) y = P⊥ y

is the output's part in its trailing principal directions, computed from the outputs alone.
Isotropic noise spreads evenly over all directions; this error lives where the output has the
least energy, and the rest of the model may treat those directions very differently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from onnx_lowrank.graph import Layer

__all__ = ["kept_directions", "representative_rank", "shifted", "truncation_error"]

#: The truncation that stands for all ranks: the one keeping this fraction of a channel SVD's MACs.
KEPT_MACS = 0.5
#: Channels per group up to which `kept_directions` reads the output's ``T x T`` second moments.
DENSE_CHANNELS = 2048
#: Below this fraction of the output's energy in the discarded directions there is nothing to perturb.
NEGLIGIBLE = 1e-12


def _channels(layer: Layer) -> tuple[int, int, int]:
    """(channel axis of the output, groups, input size per group D) of the layer's product."""
    if layer.op == "Conv":
        return 1, layer.conv.group, math.prod(layer.weight.shape[1:])
    if layer.op == "ConvTranspose":
        groups = layer.conv.group
        return 1, groups, layer.weight.shape[0] // groups * math.prod(layer.weight.shape[2:])
    rows, cols = layer.matrix().shape
    if layer.op == "MatMul" and layer.weight_side == "left":
        return -2, 1, cols
    return -1, 1, rows


def representative_rank(layer: Layer, outputs: int) -> int:
    """The rank r of a channel SVD keeping `KEPT_MACS` of the layer's MACs, per group: the
    factors cost ``r·(D + T)`` of the dense ``T·D`` per output vector, so
    ``r = max(1, floor(KEPT_MACS · T·D / (T + D)))`` with `outputs` = T channels per group."""
    dim = _channels(layer)[2]
    return max(1, math.floor(KEPT_MACS * outputs * dim / (outputs + dim)))


def _vectors(layer: Layer, signal: np.ndarray) -> np.ndarray:
    """The output's channel vectors per group, ``[groups, n, T/groups]`` float64."""
    axis, groups, _ = _channels(layer)
    moved = np.moveaxis(np.asarray(signal, dtype=np.float64), axis, -1)
    flat = moved.reshape(-1, groups, moved.shape[-1] // groups)
    return np.swapaxes(flat, 0, 1)


def kept_directions(layer: Layer, signals: Iterable[np.ndarray]) -> list[np.ndarray] | None:
    """Per group, an orthonormal basis ``U_r`` (``[T/g, r]``) of the directions the layer's rank-r
    truncation keeps: the leading eigenvectors of the output second moments ``Σ yyᵀ`` over all
    `signals` (outputs without bias), ``r = representative_rank``. Up to `DENSE_CHANNELS`
    channels per group from the ``T x T`` moments; past that (a head over thousands of classes,
    seen by few vectors) from the SVD of the stacked vectors, ``n x T``.

    None when nothing would be discarded: one channel per group (a depthwise conv), or less than
    `NEGLIGIBLE` of the output's energy past rank r.
    """
    moments, stacked = 0.0, []
    for signal in signals:
        vectors = _vectors(layer, signal)
        if vectors.shape[-1] <= DENSE_CHANNELS:
            moments = moments + np.swapaxes(vectors, 1, 2) @ vectors
        else:
            stacked.append(vectors)
    if stacked:
        _, singular, rows = np.linalg.svd(np.concatenate(stacked, axis=1), full_matrices=False)
        values, bases = singular ** 2, np.swapaxes(rows, 1, 2)
    elif isinstance(moments, np.ndarray):
        values, bases = np.linalg.eigh(moments)
        values, bases = values[:, ::-1].clip(0), bases[:, :, ::-1]
    else:
        return None
    channels = bases.shape[1]
    rank = representative_rank(layer, channels)
    discarded = float(values.sum() - values[:, :rank].sum())
    if channels < 2 or rank >= channels or discarded <= NEGLIGIBLE * max(float(values.sum()), 1e-300):
        return None
    return [basis[:, :rank] for basis in bases]


def truncation_error(layer: Layer, signal: np.ndarray, bases: list[np.ndarray]) -> np.ndarray:
    """``P⊥ y = y - U_r U_rᵀ y`` for each channel vector of `signal` (the output without bias),
    per group, shaped like `signal` (float64)."""
    axis = _channels(layer)[0]
    vectors = _vectors(layer, signal)
    dropped = np.stack([v - (v @ b) @ b.T for v, b in zip(vectors, bases, strict=True)])
    shape = list(signal.shape)
    shape.append(shape.pop(axis))
    return np.moveaxis(np.swapaxes(dropped, 0, 1).reshape(shape), -1, axis)


def shifted(y: np.ndarray, signal: np.ndarray, relative: float, layer: Layer, bases: list[np.ndarray]):
    """`y` plus its truncation error ``P⊥ signal`` (`truncation_error`) scaled to norm
    `relative·‖signal‖`, and the relative size realised (0 where the batch has no such error)."""
    error = truncation_error(layer, signal, bases)
    size = np.linalg.norm(error)
    if size == 0 or not np.any(signal):
        return y, 0.0
    return (y + error * (relative * np.linalg.norm(signal) / size)).astype(y.dtype), relative
