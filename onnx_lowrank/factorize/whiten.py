"""Data-aware factorizations: fit a layer's OUTPUT on calibration moments, not its weights.

With the moments of `moments` (``Sxx``, ``Stt``, ``Sxt`` of the layer's input patches ``p``
and, in sequential fitting, ``p~``); references: SVD-LLM / Zhang et al. 2015 for whitening,
reduced-rank regression for the sequential target:

* :func:`whitened_svd`: with ``L = chol(Stt + eps I)`` the rank-r ``A B`` minimising
  ``E||M p~ - A B p~||^2`` is the truncated SVD of ``M L`` with ``B`` right-multiplied by
  ``L^-1``; :func:`regression_target` gives ``M = W* = W Sxt Stt^-1`` in sequential mode.
* :func:`whitened_channel_svd`, :func:`whitened_spatial_svd`, :func:`whitened_tiled_svd`,
  :func:`data_tucker2`: the data-aware counterparts of ``channel_svd``, ``spatial_svd``,
  ``tiled_svd`` and ``tucker2``, with the same stage layouts and result types.

This module never imports onnx; it is deterministic (no random numbers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .base import (
    check_groups,
    check_kernel,
    check_matrix,
    leading_eigh,
    per_group,
)
from .linalg import regularized, solve_spd, whitened_svd
from .moments import Moments, SampleMoments, _GroupStats
from .svd import (
    SVDFactors,
    TiledSVDFactors,
    channel_factors,
    check_channel_svd,
    check_spatial_svd,
    check_tiles,
    spatial_factors,
    spatial_matrix,
    tiled_factors,
)
from .tucker import TuckerFactors, check_tucker_ranks, tucker_result, tucker_stages

__all__ = [
    "DataTuckerFactors",
    "data_tucker2",
    "shrinkage",
    "whitened_channel_svd",
    "whitened_rows",
    "whitened_spatial_svd",
    "whitened_tiled_svd",
]

# ----------------------------------------------------------------------------- whitening


def shrinkage(moments: Moments) -> float:
    """Regularisation of the input second moment `Σ + ε·(tr Σ / D)·I`, `ε = 1e-6 + D / n`.

    With n input vectors of dimension D, Σ estimated from fewer vectors than dimensions is
    rank-deficient and a whitened fit would ignore every direction the calibration set missed;
    shrinking towards the identity (weight-only fitting) in proportion to D/n keeps a small
    calibration set from doing worse than no calibration at all (Ledoit–Wolf-style shrinkage).
    """
    return 1e-6 + moments.dim / max(moments.n, 1)


def whitened_rows(W_rows: np.ndarray, moments, rank: int, *, eps: float = 1e-6):
    """The whitened SVD ``(A, B, singular values)`` of one lowered weight ``W_rows [m, D]``
    (group 0; a matrix ``x @ W`` passes ``W^T``): of ``W`` itself when the moments are unpaired,
    else of the regression target ``W Sxt Stt^-1`` (:func:`linalg.regression_target`), under
    ``Stt`` (:func:`linalg.whitened_svd`). Dense or sample-space moments alike."""
    method = "whitened_rows"
    W64 = check_matrix(method, W_rows)
    stats = _check_moments(method, moments, 1, W64.shape[1]).group(0)
    return stats.whitened(stats.target(W64, eps), rank, eps)


def _check_moments(method: str, moments: object, groups: int, dim: int) -> Moments | SampleMoments:
    if not isinstance(moments, Moments | SampleMoments):
        raise ValueError(f"{method}: expected a Moments accumulator, found {type(moments).__name__}")
    if moments.n == 0:
        raise ValueError(f"{method}: the moments hold no patches")
    if (moments.groups, moments.dim) != (groups, dim):
        raise ValueError(
            f"{method}: the moments have {moments.groups} groups x {moments.dim} patch values; "
            f"the kernel needs {groups} x {dim}"
        )
    return moments


def _group_stats(moments: Moments, groups: int) -> Iterator[_GroupStats]:
    """Each group's (non-centred) statistics in turn, for :func:`per_group`."""
    return (moments.group(index) for index in range(groups))


# ----------------------------------------------------------------------------- data-aware SVDs


def whitened_channel_svd(
    kernel: np.ndarray, groups: int, rank: int, moments: Moments, *, eps: float = 1e-6
) -> SVDFactors:
    """Channel SVD fitted to the layer's output: whitened SVD of each lowered group weight.

    Per group i, with ``W_i [T/g, D]`` and the group's moments: ``M_i = W_i`` (``p~ = p``) or
    the regression target ``W_i Sxt Stt^-1`` (sequential moments), then
    ``A_i, B_i = whitened_svd(W_i, Stt, r, target=M_i)``: ``A_i B_i`` minimises
    ``E||W_i p - A_i B_i p~||^2`` over rank r. Stages exactly as :func:`channel_svd`:
    ``[g*r, S/g, k..]`` (B, group g, the original strides/dilations/pads) then ``[T, r, 1..]``
    (A, group g). ``singular_values`` are per group those of ``M_i L_i`` (their discarded energy
    is the output error); ``rel_error`` is the relative WEIGHT error against ``kernel`` (reporting).

    Args:
        kernel: float array ``[T, S/g, k1..kN]``.
        groups: the Conv's ``group`` attribute.
        rank: per-group rank ``1..min(T/g, D)``.
        moments: patch moments with ``groups`` groups of ``D = (S/g)*prod(k)`` values.
        eps: the relative ridge of the whitening (see :func:`regularized`).

    Raises:
        ValueError: bad kernel, groups, rank or moments.
    """
    method = "whitened_channel_svd"
    kernel64, groups, rank = check_channel_svd(method, kernel, groups, rank)
    moments = _check_moments(method, moments, groups, math.prod(kernel64.shape[1:]))

    def factor_group(lowered: np.ndarray, stats: _GroupStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return stats.whitened(stats.target(lowered, eps), rank, eps)

    return channel_factors(kernel64, groups, rank, factor_group, _group_stats(moments, groups))


def whitened_spatial_svd(
    kernel: np.ndarray, groups: int, rank: int, moments: Moments, *, eps: float = 1e-6
) -> SVDFactors:
    """Spatial SVD (``kh x kw`` -> ``kh x 1`` then ``1 x kw``) with its row space whitened by the data.

    Per group, ``M[(s, i), (t, j)] = W[t, s, i, j]`` (``(S/g)*kh x (T/g)*kw``; W replaced by the
    regression target when the moments are sequential). The output is
    ``y_t = sum_j M[:, (t, j)]^T v_j`` with ``v_j`` the vertical patch ``x[s, h + i, w + j]``
    (length ``(S/g)*kh``). APPROXIMATION: the error ``E||sum_j E_j^T v_j||^2`` is replaced by
    ``sum_j E||E_j^T v_j||^2`` with one vertical-patch covariance
    ``C_v[(s,i),(s',i')] = mean_j Sigma[(s,i,j),(s',i',j)]`` (the full patch covariance's
    diagonal blocks averaged over the horizontal offset j): correlations between different
    horizontal offsets are ignored. Then ``||L_v^T (M - P Q)||_F`` is minimised by the whitened
    SVD of ``M^T`` under ``C_v`` (``M^T ~ A B``, ``P = B^T``, ``Q = A^T``). Stages exactly as
    :func:`spatial_svd`: ``[g*r, S/g, kh, 1]`` then ``[T, r, 1, kw]``, groups g.

    Raises:
        ValueError: not a 2-D kernel, bad groups, rank or moments.
    """
    method = "whitened_spatial_svd"
    kernel64, groups, rank = check_spatial_svd(method, kernel, groups, rank)
    _, in_g, kh, kw = kernel64.shape
    moments = _check_moments(method, moments, groups, in_g * kh * kw)

    def factor_group(block: np.ndarray, stats: _GroupStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        target = stats.target(block.reshape(block.shape[0], -1), eps).reshape(block.shape)
        vertical = np.einsum("sijtkj->sitk", stats.tt.reshape(in_g, kh, kw, in_g, kh, kw)) / kw
        left_t, right_t, values = whitened_svd(spatial_matrix(target).T, vertical.reshape(in_g * kh, -1), rank, eps=eps)
        return right_t.T, left_t.T, values  # M^T ~ A B, so M ~ B^T A^T

    return spatial_factors(kernel64, groups, rank, factor_group, _group_stats(moments, groups))


def whitened_tiled_svd(
    kernel: np.ndarray, tiles: tuple[int, int], rank: int, moments: Moments, *, eps: float = 1e-6
) -> TiledSVDFactors:
    """Tiled SVD (Lee et al.) with each tile whitened by its column tile's patch covariance.

    Tile ``(i, j)`` is ``W[i-th T block, j-th S block]`` lowered to ``[T/a, (S/b)*prod(k)]``
    (W replaced by the regression target when the moments are sequential); it reads the patch
    entries of channel block j, ``p_j = p[j*(S/b)*prod(k) : (j+1)*(S/b)*prod(k)]``, and is
    factored by ``whitened_svd(W_ij, Sigma_jj, r)`` with ``Sigma_jj`` that block's diagonal
    block of the patch second moments. APPROXIMATION: ``y_i = sum_j W_ij p_j``, and the
    cross terms ``E[(E_ij p_j)^T (E_ij' p_j')]`` between column tiles are ignored. Stages,
    groups and the channel shuffle exactly as :func:`tiled_svd`.

    Args:
        kernel: float array ``[T, S, k1..kN]`` (ungrouped).
        tiles: ``(a, b)`` dividing T and S.
        rank: per-tile rank ``1..min(T/a, (S/b)*prod(k))``.
        moments: one group of ``D = S*prod(k)`` values.
        eps: the relative ridge of the whitening.

    Raises:
        ValueError: bad kernel, tiles, rank or moments.
    """
    method = "whitened_tiled_svd"
    kernel64 = check_kernel(method, kernel)
    tiles, rank = check_tiles(method, kernel64, tiles, rank)
    out_channels, in_channels, *spatial = kernel64.shape
    moments = _check_moments(method, moments, 1, in_channels * math.prod(spatial))
    stats = moments.group(0)
    width = in_channels // tiles[1] * math.prod(spatial)

    def factor_tile(tile: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        columns = slice(j * width, (j + 1) * width)
        return stats.whitened(tile, rank, eps, columns)

    lowered = stats.target(kernel64.reshape(out_channels, -1), eps)
    return tiled_factors(kernel64, lowered, tiles, rank, factor_tile)


# ----------------------------------------------------------------------------- data-aware Tucker-2


@dataclass(frozen=True, eq=False)
class DataTuckerFactors(TuckerFactors):
    """Tucker-2 (or Tucker-1) factors fitted to the data by :func:`data_tucker2`.

    ``mode_spectra`` hold per group the data spectra: ``(sqrt of the eigenvalues of the output
    second moments W* Stt W*^T, sqrt of the eigenvalues of the input channel second moments)``,
    descending. ``n_iter`` is 0.
    """

    @property
    def error_bound(self) -> float:
        """NaN: the HOSVD bound on the weight error does not hold for a data-fitted core."""
        return math.nan


def _unit_trace(matrix: np.ndarray) -> np.ndarray:
    trace = float(np.trace(matrix))
    return matrix / trace if trace > 0 else matrix


def data_tucker2(
    kernel: np.ndarray,
    groups: int,
    ranks: tuple[int | None, int | None],
    moments: Moments,
    *,
    eps: float = 1e-6,
) -> DataTuckerFactors:
    """Tucker-2 of a conv kernel fitted to the layer's output, per group.

    Per group, with ``Sigma = Stt`` (``[D, D]``, D ordered ``(s, κ)``), ``M = W`` or the
    regression target ``W Sxt Stt^-1`` (sequential moments):

    * output factor ``U [T/g, Rt]``: the top-Rt eigenvectors of the output second moments
      ``M Sigma M^T`` (the PCA of ``y``);
    * input factor ``V [S/g, Rs]``: the top-Rs eigenvectors of the input CHANNEL second moments
      ``C[s, s'] = sum_κ Sigma[(s, κ), (s', κ)]``;
    * core by least squares given U and V: with ``Z = V^T ⊗ I_taps`` (patch -> reduced patch
      ``(b, κ)``), ``G = U^T W Sxt Z^T (Z Stt Z^T + ridge)^-1`` (``W Sxt = W* Stt``; ridge
      ``eps`` relative to the mean variance), reshaped to ``[Rt, Rs, k..]``. Since U is
      orthonormal this minimises ``E||W p - U G Z p~||^2`` given U and V.

    ``Rt = None`` keeps the output mode (``U = I``, method ``"tucker1-in"``), ``Rs = None`` the
    input mode (``Z = I``, ``"tucker1-out"``). Stages, groups and result exactly as :func:`tucker2`:
    ``[g*Rs, S/g, 1..]`` (V^T), ``[g*Rt, Rs, k..]`` (G, the original strides/dilations/pads),
    ``[T, Rt, 1..]`` (U), all group g. Full ranks are exact up to the ridge.

    Raises:
        ValueError: bad kernel, groups, ranks or moments.
    """
    method = "data_tucker2"
    kernel64 = check_kernel(method, kernel)
    groups = check_groups(method, groups, kernel64.shape)
    rank_out, rank_in = check_tucker_ranks(method, ranks, kernel64.shape, groups)
    out_g, in_g, *spatial = kernel64.shape
    out_g //= groups
    taps = math.prod(spatial)
    dim = in_g * taps
    moments = _check_moments(method, moments, groups, dim)

    def factor_one(block: np.ndarray, stats: _GroupStats) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray]]:
        block = block.reshape(out_g, dim)
        target = stats.target(block, eps)
        # Both modes shrink towards weight-only HOSVD as eps grows (few calibration vectors):
        # the output mode through the regularised second moment, the input mode by blending the
        # data's channel second moment with the kernel's input-mode Gram matrix.
        out_values, out_basis = leading_eigh(target @ regularized(stats.tt, eps) @ target.T, rank_out or 0)
        channel = np.einsum("akbk->ab", stats.tt.reshape(in_g, taps, in_g, taps))
        kernel_gram = np.einsum("tak,tbk->ab", *(block.reshape(out_g, in_g, taps),) * 2)
        channel = _unit_trace(channel) + eps * _unit_trace(kernel_gram)
        in_values, in_basis = leading_eigh(channel, rank_in or 0)
        def project(rows: np.ndarray) -> np.ndarray:
            """`Uᵀ · rows · Zᵀ`: a `[T/g, D]` map expressed in the reduced bases."""
            if rank_out is not None:
                rows = out_basis.T @ rows
            if rank_in is None:
                return rows
            rows = np.tensordot(rows.reshape(-1, in_g, taps), in_basis, axes=(1, 0))
            return rows.transpose(0, 2, 1).reshape(-1, rank_in * taps)

        numerator = project(block @ stats.xt)  # Uᵀ W Sxt Zᵀ
        if rank_in is None:
            gram = stats.tt
        else:
            reduced = np.tensordot(in_basis, stats.tt.reshape(in_g, taps, in_g, taps), axes=(0, 0))
            gram = np.tensordot(reduced, in_basis, axes=(2, 0)).transpose(0, 1, 3, 2).reshape(rank_in * taps, -1)
        shrunk = regularized(gram, eps)
        # Ridge towards the weight-only core Uᵀ W Zᵀ, not towards 0.
        core = solve_spd(method, shrunk, numerator + project(block) @ (shrunk - gram))
        stages = tucker_stages(
            None if rank_in is None else in_basis,
            core.reshape(core.shape[0], rank_in or in_g, *spatial),
            None if rank_out is None else out_basis,
        )
        return stages, (np.sqrt(out_values), np.sqrt(in_values))

    results = per_group(kernel64, groups, factor_one, _group_stats(moments, groups))
    return tucker_result(DataTuckerFactors, kernel64, groups, (rank_out, rank_in), results, n_iter=0)

