"""Refits: given the earlier stages of any chain, its last stage by ridge least squares.

:func:`refit_last` / :func:`refit_chain` / :func:`refit_matrix` fit the last stage's weight
against the ORIGINAL layer's output on calibration moments (see `moments`), and
:func:`bias_shift` gives the remaining mean output difference, added to the last node's bias.

This module never imports onnx; it is deterministic (no random numbers).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from .base import (
    check_groups,
    check_int,
    check_kernel,
    check_matrix,
    compose_chain,
    fmt_shape,
)
from .linalg import check_square, solve_spd
from .moments import Moments, _GroupStats
from .whiten import _check_moments

__all__ = ["bias_shift", "refit_chain", "refit_last", "refit_matrix"]


# ----------------------------------------------------------------------------- refits


def refit_last(
    W_rows: np.ndarray, H: np.ndarray, cov_xt: np.ndarray, cov_tt: np.ndarray, ridge: float = 1e-3,
    prior: np.ndarray | None = None,
) -> np.ndarray:
    """The last factor ``A [m, q]`` of a chain given its earlier stages ``H [q, D]``, by ridge least squares.

    Minimises ``E||W p - A H p~||^2 + λ ||A - A0||_F^2`` (W = ``W_rows [m, D]``, the original
    map, A0 = `prior` or 0):

        ``A = (W Sxt H^T + λ A0)(H Stt H^T + λ I)^-1``,   ``λ = ridge * trace(H Stt H^T) / q``

    (λ relative to the mean variance of the last stage's inputs; ``ridge`` when that is 0).
    Pass centred covariances (and add :func:`bias_shift`) for the joint optimum of weight and
    bias; non-centred ones fit the weight alone. For ``MatMul(W, X)`` (weight on the left) the
    last factor is the left one: ``W ~ A H`` directly.

    Raises:
        ValueError: inconsistent shapes, a negative ridge or non-finite values.
    """
    method = "refit_last"
    W64 = check_matrix(method, W_rows)
    H64 = check_matrix(method, H)
    if H64.shape[1] != W64.shape[1]:
        raise ValueError(f"{method}: H {fmt_shape(H64.shape)} does not match W_rows {fmt_shape(W64.shape)}")
    dim = W64.shape[1]
    cov_xt = check_square(method, "cov_xt", cov_xt, dim)
    cov_tt = check_square(method, "cov_tt", cov_tt, dim)
    return _refit_solution(H64 @ cov_tt @ H64.T, W64 @ cov_xt @ H64.T, ridge, prior)


def _refit_solution(gram: np.ndarray, rhs: np.ndarray, ridge: float, prior: np.ndarray | None) -> np.ndarray:
    """``A = (rhs + λ A0)(gram + λ I)^-1``, ``λ = ridge · trace(gram) / q``: :func:`refit_last` from
    the products ``gram = H Stt Hᵀ`` and ``rhs = W Sxt Hᵀ`` (dense or sample-space moments)."""
    if not isinstance(ridge, numbers.Real) or not ridge >= 0:
        raise ValueError(f"refit_last: ridge must be a number >= 0, found {ridge!r}")
    size = gram.shape[0]
    lam = float(ridge) * float(np.trace(gram)) / size
    if lam <= 0:
        lam = float(ridge) if ridge > 0 else 0.0
    gram = gram + lam * np.eye(size)
    if prior is not None:  # ridge towards the factor as factorized, not towards 0
        rhs = rhs + lam * np.asarray(prior, dtype=np.float64).reshape(rhs.shape)
    return solve_spd("refit_last", gram, rhs)


def bias_shift(
    W_rows: np.ndarray, A: np.ndarray, H: np.ndarray, mean_x: np.ndarray, mean_t: np.ndarray
) -> np.ndarray:
    """``W E[p] - A H E[p~]`` ``[m]``: the mean output difference left by the chain ``A H``.

    Adding it to the last node's bias makes the chain's mean output equal the original's; with
    A from :func:`refit_last` on centred covariances the pair is the joint least-squares optimum.
    """
    W64 = np.asarray(W_rows, dtype=np.float64)
    return W64 @ np.asarray(mean_x, dtype=np.float64) - np.asarray(A, np.float64) @ (
        np.asarray(H, np.float64) @ np.asarray(mean_t, dtype=np.float64)
    )


def _lift(first: np.ndarray, last_kernel: Sequence[int], kernel: Sequence[int]) -> np.ndarray:
    """Patch -> last-stage patch map ``[M*prod(b), (S/g)*prod(k)]`` of earlier stages ``first [M, S/g, a..]``.

    The last stage (kernel b) reads ``z_m`` at offsets v; ``z_m(pos + v) = sum K1[m, s, u]
    x[s, pos + v + u]``, so ``H[(m, v), (s, κ)] = K1[m, s, κ - v]`` when ``0 <= κ - v < a``.
    """
    out = np.zeros((first.shape[0], *last_kernel, first.shape[1], *kernel))
    outer = first.shape[2:]
    for offset in np.ndindex(*last_kernel):
        window = (slice(None), *offset, slice(None), *(slice(v, v + a) for v, a in zip(offset, outer, strict=True)))
        out[window] = first
    return out.reshape(first.shape[0] * math.prod(last_kernel), -1)


def refit_chain(
    factors_weights: Sequence[np.ndarray],
    groups_per_stage: Sequence[int],
    last_groups: int,
    groups: int,
    moments: Moments,
    original_kernel: np.ndarray,
    input_orders: Sequence[np.ndarray | None] | None = None,
    ridge: float = 1e-3,
    *,
    with_bias: bool = True,
    refit: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Refit the last stage of any conv chain against the original layer's output.

    The stages before the last are composed with :func:`compose_chain` (grouped stages, channel
    shuffles via ``input_orders``) into ``K1 [M, S/g, a..]`` (M mid channels, original groups
    concatenated; the shuffle before the last stage, ``input_orders[-1]``, permutes them), then
    lifted to the map ``H`` from the original patch to the last stage's own im2col patch
    (``H[(m, v), (s, κ)] = K1[m, s, κ - v]``: works for pointwise last stages and for the
    spatial SVD's ``1 x kw`` one). The last stage, ONNX group ``last_groups`` (a multiple of
    ``groups``), maps mid-channel block o to output block o; block o belongs to original group
    ``o * groups // last_groups`` (for the tiled SVD, groups 1 and ``last_groups = a``: every
    block reads the whole patch). Per block, :func:`refit_last` with W's rows of that block
    and H's rows of that block gives the new weight.

    ``with_bias=True`` (default) fits on CENTRED covariances and returns
    ``bias_delta = W E[p] - A H E[p~]``: weight and bias delta are then jointly optimal and must
    be used together (add ``bias_delta`` to the last node's bias, creating one if needed).
    ``with_bias=False`` fits on the non-centred moments and returns zeros.
    ``refit=False`` keeps the last weight (returned unchanged) and only measures the bias delta
    ``W E[p] - A H E[p~]`` with it (bias correction alone). So pass the two switches as they
    are: ``refit=do_refit, with_bias=do_bias_correction``.

    Args:
        factors_weights: ALL stage weights of the chain, in order (float arrays).
        groups_per_stage: the ONNX group of each stage (all stages, or all but the last).
        last_groups: the last stage's ONNX group.
        groups: the original kernel's groups.
        moments: patch moments, ``groups`` groups of ``D = (S/g)*prod(k)``.
        original_kernel: ``[T, S/g, k..]``.
        input_orders: per stage, the channel order before it (as ``compose_chain``), or None.
        ridge: relative ridge of :func:`refit_last`.
        with_bias: fit weight and bias jointly and return the bias delta (else zeros).
        refit: refit the last weight (else keep it).

    Returns:
        ``(new_last_weight, bias_delta)``: the last weight in its original shape and dtype, and
        ``[T]`` (same dtype).

    Raises:
        ValueError: inconsistent shapes or groups, or a chain that does not compose to the
            kernel's spatial shape.
    """
    method = "refit_chain"
    kernel64 = check_kernel(method, original_kernel)
    groups = check_groups(method, groups, kernel64.shape)
    weights = list(factors_weights)
    if len(weights) < 2:
        raise ValueError(f"{method}: a chain needs at least two stages, found {len(weights)}")
    if any(not isinstance(w, np.ndarray) or not np.issubdtype(w.dtype, np.floating) for w in weights):
        raise ValueError(f"{method}: the stage weights must be float numpy arrays")
    last_groups = check_int(method, "last_groups", last_groups)
    stage_groups = [check_int(method, "groups_per_stage", g) for g in groups_per_stage]
    if len(stage_groups) == len(weights):
        if stage_groups[-1] != last_groups:
            raise ValueError(f"{method}: last_groups={last_groups} but groups_per_stage ends with {stage_groups[-1]}")
        stage_groups = stage_groups[:-1]
    elif len(stage_groups) != len(weights) - 1:
        raise ValueError(f"{method}: {len(stage_groups)} groups for {len(weights)} stages")
    orders = list(input_orders) if input_orders is not None else [None] * len(weights)
    if len(orders) != len(weights):
        raise ValueError(f"{method}: {len(orders)} input orders for {len(weights)} stages")
    out_channels, in_g, *spatial = kernel64.shape
    last = weights[-1]
    if last.ndim != kernel64.ndim or last.shape[0] != out_channels:
        raise ValueError(
            f"{method}: the last stage {fmt_shape(last.shape)} does not output the kernel's {out_channels} channels"
        )
    if last_groups % groups or out_channels % last_groups:
        raise ValueError(
            f"{method}: last_groups={last_groups} must be a multiple of groups={groups} dividing {out_channels}"
        )
    dim = in_g * math.prod(spatial)
    moments = _check_moments(method, moments, groups, dim)
    first = compose_chain([np.asarray(w, np.float64) for w in weights[:-1]], stage_groups, groups, orders[:-1])
    if orders[-1] is not None:
        first = first[np.asarray(orders[-1])]
    mid_per_block = last.shape[1]
    last_kernel = last.shape[2:]
    if first.shape[0] != mid_per_block * last_groups or first.shape[1] != in_g or any(
        a + b - 1 != k for a, b, k in zip(first.shape[2:], last_kernel, spatial, strict=True)
    ):
        raise ValueError(
            f"{method}: the stages compose to {fmt_shape(first.shape)} and a last stage "
            f"{fmt_shape(last.shape)} (group {last_groups}), which do not make a {fmt_shape(kernel64.shape)} kernel"
        )
    out_block = out_channels // last_groups
    new_last = np.empty(last.shape)
    delta = np.zeros(out_channels)
    stats_cache: dict[int, _GroupStats] = {}
    for block in range(last_groups):
        group = block * groups // last_groups
        if group not in stats_cache:
            stats_cache[group] = moments.group(group, centered=with_bias and refit)
        stats = stats_cache[group]
        H = _lift(first[block * mid_per_block : (block + 1) * mid_per_block], last_kernel, spatial)
        rows = slice(block * out_block, (block + 1) * out_block)
        W_rows = kernel64[rows].reshape(out_block, dim)
        current = np.asarray(last[rows], dtype=np.float64).reshape(out_block, -1)
        A = _refit_solution(*stats.cross(W_rows, H), ridge, current) if refit else current
        new_last[rows] = A.reshape(out_block, mid_per_block, *last_kernel)
        if with_bias:
            delta[rows] = bias_shift(W_rows, A, H, stats.mean_x, stats.mean_t)
    if not refit:
        new_last = last.copy()
    return new_last.astype(last.dtype), delta.astype(last.dtype)


def refit_matrix(
    W: np.ndarray,
    P: np.ndarray,
    moments: Moments,
    ridge: float = 1e-3,
    *,
    with_bias: bool = True,
    refit: bool = True,
    Q: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Refit the second factor of ``x @ W ~ (x @ P) @ Q`` (Gemm/MatMul) against the original output.

    With rows ``x`` (patches of one group, ``D = K``) and ``y = W^T x``, the chain is
    ``Q^T P^T x``: :func:`refit_last` with ``W_rows = W^T``, ``H = P^T`` gives ``Q = A^T``;
    ``with_bias`` and ``refit`` as in :func:`refit_chain` (centred fit plus
    ``bias_delta = W^T E[x] - Q^T P^T E[x~]``; ``refit=False`` keeps the given ``Q``).

    Args:
        W: ``[K, N]``, the original weight of ``x @ W``.
        P: ``[K, r]``, the first factor (kept).
        moments: one group of ``K`` values (rows of x, and of x~ in sequential mode).
        ridge: relative ridge of :func:`refit_last`.
        with_bias: fit weight and bias jointly and return the bias delta (else zeros).
        refit: refit Q (else keep ``Q``, which is then required).
        Q: ``[r, N]``, the current second factor (only read when ``refit`` is False).

    Returns:
        ``(Q [r, N], bias_delta [N])`` in float64.
    """
    method = "refit_matrix"
    W64 = check_matrix(method, W)
    P64 = check_matrix(method, P)
    if P64.shape[0] != W64.shape[0]:
        raise ValueError(f"{method}: P {fmt_shape(P64.shape)} does not match W {fmt_shape(W64.shape)}")
    moments = _check_moments(method, moments, 1, W64.shape[0])
    stats = moments.group(0, centered=with_bias and refit)
    if refit:
        A = _refit_solution(*stats.cross(W64.T, P64.T), ridge, None if Q is None else np.asarray(Q).T)
    else:
        if Q is None:
            raise ValueError(f"{method}: refit=False needs the current second factor Q")
        A = check_matrix(method, Q).T
        if A.shape != (W64.shape[1], P64.shape[1]):
            raise ValueError(f"{method}: Q {fmt_shape(A.T.shape)} does not match P {fmt_shape(P64.shape)} and W")
    delta = bias_shift(W64.T, A, P64.T, stats.mean_x, stats.mean_t) if with_bias else np.zeros(W64.shape[1])
    return A.T, delta
