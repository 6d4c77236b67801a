"""CP (CANDECOMP/PARAFAC) factorizations of conv kernels.

Lebedev et al. 2015, "Speeding-up convolutional neural networks using fine-tuned
CP-decomposition", and its higher-order form (Kossaifi et al. 2020, "Factorized higher-order
CNNs"): ``W[t, s, k1..kN] ~ sum_r lambda_r At[t, r] As[s, r] A1[k1, r] .. AN[kN, r]`` becomes a
pointwise conv, one depthwise conv per spatial dim and a pointwise conv. ``cp_depthwise``
flattens the spatial modes (3-way CP of ``T x S x prod(k)``): pointwise, one depthwise
``k1 x .. x kN``, pointwise, the MobileNet block.

Algorithm, per group (fast enough for a 512x512x3x3 kernel at rank 256 in seconds):

1. compress: project the two channel modes on their leading ``min(R, T)`` / ``min(R, S)``
   HOSVD vectors (exact when R covers the mode, and for any tensor of CP rank <= R);
2. initialise: an algebraic (GEVD) init, exact for a CP-rank-R tensor when R <= T, S and
   ``prod(k) >= 2`` (Sanchez and Kowalski 1990; Leurgans et al. 1993), and the SVD init;
   run a few ALS sweeps from each and keep the better;
3. CP-ALS on the compressed core with MTTKRPs through the small Khatri-Rao products only,
   bounded by ``n_iter_max``, ``tol`` and a wall-clock ``time_limit_s``;
4. expand the channel factors with the HOSVD bases.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import (
    ConvFactors,
    build,
    check_groups,
    check_int,
    check_kernel,
    check_rank,
    mode_basis,
    per_group,
    stack_groups,
)

__all__ = ["CPFactors", "cp", "cp_depthwise"]

logger = logging.getLogger(__name__)

# ALS sweeps run from each initialisation before keeping the better one.
PROBE_SWEEPS = 10


@dataclass(frozen=True, eq=False)
class CPFactors(ConvFactors):
    """CP factors of a conv kernel as a pointwise / depthwise / pointwise chain.

    Attributes:
        n_iter: ALS sweeps of the kept run (the largest count over the groups).
        stop_reason: why ALS stopped: ``"tol"`` (converged), ``"n_iter_max"`` or
            ``"time_limit"`` (the only outcome that depends on the machine's speed); the worst
            over the groups in that order.
    """

    n_iter: int
    stop_reason: str

    @property
    def fit(self) -> float:
        """``1 - rel_error``."""
        return 1.0 - self.rel_error


@dataclass
class _ALSRun:
    factors: list[np.ndarray]
    error: float
    sweeps: int
    stop_reason: str


def cp(
    kernel: np.ndarray,
    rank: int,
    groups: int = 1,
    n_iter_max: int = 100,
    time_limit_s: float | None = 25.0,
    tol: float = 1e-8,
    seed: int = 0,
) -> CPFactors:
    """CP decomposition of an (N+2)-way conv kernel, per group (Lebedev et al. 2015).

    ``W_g[t, s, k1..kN] ~ sum_r lambda_r At[t, r] As[s, r] A1[k1, r] .. AN[kN, r]``, the
    higher-order case for N = 3 (Kossaifi et al. 2020). Stages: ``[g*R, S/g, 1..]`` (As^T,
    group g); for each spatial dim n a depthwise ``[g*R, 1, 1.., k_n, 1..]`` (A_n, ``k_n``
    along dim n, group g*R, carrying that dim's stride, dilation and pads); then
    ``[T, R, 1..]`` (``At diag(lambda)``, group g). As and the A_n have unit columns.

    CP at a fixed rank is not exact in general; the result reports ``fit``. A kernel of CP
    rank R <= T/g, S/g with ``prod(k) >= 2`` is recovered to rounding. The result depends only
    on the input and ``seed`` unless ``stop_reason == "time_limit"``.

    Args:
        kernel: float array ``[T, S/g, k1..kN]``, N = 1, 2 or 3.
        rank: per-group rank R, at most an upper bound on the rank of a ``[T/g, S/g, k..]`` tensor.
        groups: the Conv's ``group`` attribute.
        n_iter_max: ALS sweeps at most per group, including the init probes.
        time_limit_s: wall-clock budget of the whole call (None: unbounded), shared by the groups.
        tol: stop when a sweep changes the relative error by less than this.
        seed: seed of the random columns of the SVD init and of the GEVD slice mixing.

    Raises:
        ValueError: bad kernel, groups, rank or settings.
    """
    return _cp_chain("cp", kernel, rank, groups, n_iter_max, time_limit_s, tol, seed, flatten=False)


def cp_depthwise(
    kernel: np.ndarray,
    rank: int,
    groups: int = 1,
    n_iter_max: int = 100,
    time_limit_s: float | None = 25.0,
    tol: float = 1e-8,
    seed: int = 0,
) -> CPFactors:
    """3-way CP of a conv kernel viewed as ``[T/g, S/g, prod(k)]``, per group: a depthwise-separable block.

    ``W_g[t, s, k] ~ sum_r lambda_r At[t, r] As[s, r] D[k, r]`` (Lebedev et al. 2015 with the
    spatial modes flattened; "a depthwise-separable conv is a CP-factorized conv"). Stages:
    ``[g*R, S/g, 1..]`` (As^T, group g), one depthwise ``[g*R, 1, k1..kN]`` (D, group g*R,
    the original strides, dilations and pads), ``[T, R, 1..]`` (``At diag(lambda)``, group g).
    Arguments, stopping and determinism as for :func:`cp`.
    """
    return _cp_chain("cp_depthwise", kernel, rank, groups, n_iter_max, time_limit_s, tol, seed, flatten=True)


def _cp_chain(
    method: str,
    kernel: np.ndarray,
    rank: int,
    groups: int,
    n_iter_max: int,
    time_limit_s: float | None,
    tol: float,
    seed: int,
    *,
    flatten: bool,
) -> CPFactors:
    """Validate, run CP per group and lay the factors out as Conv stages."""
    kernel64 = check_kernel(method, kernel)
    groups = check_groups(method, groups, kernel64.shape)
    n_iter_max = check_int(method, "n_iter_max", n_iter_max)
    seed = check_int(method, "seed", seed, minimum=0)
    if time_limit_s is not None and (not isinstance(time_limit_s, numbers.Real) or not time_limit_s > 0):
        raise ValueError(f"{method}: time_limit_s must be a positive number or None, found {time_limit_s!r}")
    if not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"{method}: tol must be a number >= 0, found {tol!r}")
    bound = max_cp_rank(kernel64.shape, groups, flatten)
    out_per_group, in_per_group, *spatial = kernel64.shape
    out_per_group //= groups
    modes = [out_per_group, in_per_group, *([math.prod(spatial)] if flatten else spatial)]
    rank = check_rank(method, rank, bound, kernel64.shape, groups=groups, limit="the largest possible CP rank")

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    ones = [1] * len(spatial)
    group_index = iter(range(1, groups + 1))

    def factor_one(block: np.ndarray) -> tuple[list[np.ndarray], _ALSRun]:
        deadline = None if time_limit_s is None else start + time_limit_s * next(group_index) / groups
        run = _cp_tensor(block.reshape(modes), rank, rng, n_iter_max, tol, deadline)
        out_factor, in_factor, *spatial_factors = run.factors
        scale = np.ones(rank)
        unit = []
        for factor in (in_factor, *spatial_factors):
            norms = np.linalg.norm(factor, axis=0)
            scale *= norms
            unit.append(factor / np.where(norms > 0, norms, 1.0))
        in_unit, *spatial_unit = unit
        stages = [in_unit.T.reshape(rank, in_per_group, *ones)]
        if flatten:
            stages.append(spatial_unit[0].T.reshape(rank, 1, *spatial))
        else:
            for dim, factor in enumerate(spatial_unit):
                shape = [1] * len(spatial)
                shape[dim] = spatial[dim]
                stages.append(factor.T.reshape(rank, 1, *shape))
        stages.append((out_factor * scale).reshape(out_per_group, rank, *ones))
        return stages, run

    results = per_group(kernel64, groups, factor_one)
    runs = [run for _, run in results]
    stages = stack_groups([stages for stages, _ in results])
    reasons = [run.stop_reason for run in runs]
    stop_reason = next(r for r in ("time_limit", "n_iter_max", "tol") if r in reasons)
    if stop_reason == "time_limit":
        logger.info("%s: time limit of %.1f s reached on a %s kernel", method, time_limit_s, list(kernel64.shape))
    return build(
        CPFactors,
        kernel64,
        method=method.replace("_", "-"),
        shape=tuple(kernel64.shape),
        ranks=(rank,),
        stages=stages,
        groups_per_stage=(groups, *[groups * rank] * (len(stages) - 2), groups),
        groups=groups,
        n_iter=max(run.sweeps for run in runs),
        stop_reason=stop_reason,
    )


def max_cp_rank(shape: Sequence[int], groups: int = 1, flatten: bool = False) -> int:
    """The largest rank `cp` accepts for a kernel of `shape`: `Π modes / max(modes)`, an upper
    bound on the rank of a tensor with those modes (`[T/g, S/g, k1..kN]`, or `[T/g, S/g, Πk]`
    for cp-depthwise, `flatten`)."""
    out_per_group, in_per_group, *spatial = shape
    modes = [out_per_group // groups, in_per_group, *([math.prod(spatial)] if flatten else spatial)]
    return math.prod(modes) // max(modes)


def _cp_tensor(
    tensor: np.ndarray,
    rank: int,
    rng: np.random.Generator,
    n_iter_max: int,
    tol: float,
    deadline: float | None,
) -> _ALSRun:
    """Rank-R CP of ``tensor [I0, I1, m1..]``: compress the modes 0 and 1, ALS, expand."""
    if not np.any(tensor):
        return _ALSRun([np.zeros((size, rank)) for size in tensor.shape], 0.0, 0, "tol")
    bases = [mode_basis(tensor, mode, min(rank, tensor.shape[mode]))[1] for mode in (0, 1)]
    core = np.tensordot(np.tensordot(bases[0], tensor, axes=(0, 0)), bases[1], axes=(1, 0))
    core = np.moveaxis(core, -1, 1)  # [r0, r1, m1..]

    starts = [init for init in (_init_gevd(core, rank, rng), _init_svd(core, rank, rng)) if init is not None]
    probe = min(PROBE_SWEEPS, n_iter_max)
    runs = [_als(core, init, probe, tol, deadline) for init in starts]
    best = min(runs, key=lambda run: run.error)
    if best.stop_reason == "n_iter_max" and n_iter_max > probe:
        more = _als(core, best.factors, n_iter_max - probe, tol, deadline)
        best = _ALSRun(more.factors, more.error, probe + more.sweeps, more.stop_reason)
    best.factors[0] = bases[0] @ best.factors[0]
    best.factors[1] = bases[1] @ best.factors[1]
    return best


def _khatri_rao(factors: Sequence[np.ndarray], rank: int) -> np.ndarray:
    """Column-wise Kronecker product ``[prod(sizes), R]``, the last factor's index fastest."""
    out = np.ones((1, rank))
    for factor in factors:
        out = (out[:, None, :] * factor[None, :, :]).reshape(-1, rank)
    return out


def _solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``rhs @ inv(gram)`` for a symmetric Gram matrix (least squares if it is singular)."""
    try:
        return np.linalg.solve(gram, rhs.T).T
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(gram, rhs.T, rcond=None)[0].T


def _als(core: np.ndarray, factors: list[np.ndarray], sweeps: int, tol: float, deadline: float | None) -> _ALSRun:
    """CP-ALS sweeps on ``core [I0, I1, m1..mM]`` from ``factors`` (one ``[size, R]`` per mode).

    The channel MTTKRPs contract one channel mode and the small modes at once
    (``X_(0) @ KR(F1, KR(small))``); the small modes share ``Z = X x_0 F0^T x_1 F1^T`` (diagonal
    in r). The relative error comes from ``||X||^2 - 2 <X, X_hat> + ||X_hat||^2``.
    """
    factors = [factor.copy() for factor in factors]
    size0, size1, *small = core.shape
    rank = factors[0].shape[1]
    unfold0 = core.reshape(size0, -1)
    unfold1 = np.moveaxis(core, 1, 0).reshape(size1, -1)
    norm2 = float(np.sum(core**2))
    error = math.inf
    for sweep in range(1, sweeps + 1):
        grams = [factor.T @ factor for factor in factors]
        small_kr = _khatri_rao(factors[2:], rank)
        small_gram = np.prod(grams[2:], axis=0)
        factors[0] = _solve(grams[1] * small_gram, unfold0 @ _khatri_rao([factors[1], small_kr], rank))
        grams[0] = factors[0].T @ factors[0]
        factors[1] = _solve(grams[0] * small_gram, unfold1 @ _khatri_rao([factors[0], small_kr], rank))
        grams[1] = factors[1].T @ factors[1]
        contracted = (factors[0].T @ unfold0).reshape(rank, size1, -1)
        z = np.einsum("rsp,sr->pr", contracted, factors[1]).reshape(*small, rank)
        for mode in range(len(small)):
            others = [m for m in range(len(small)) if m != mode]
            rhs = np.einsum(
                "kpr,pr->kr",
                np.moveaxis(z, mode, 0).reshape(small[mode], -1, rank),
                _khatri_rao([factors[2 + m] for m in others], rank),
            )
            gram = grams[0] * grams[1] * np.prod([grams[2 + m] for m in others], axis=0)
            factors[2 + mode] = _solve(gram, rhs)
            grams[2 + mode] = factors[2 + mode].T @ factors[2 + mode]
        inner = float(np.sum(rhs * factors[-1]))
        previous = error
        error = math.sqrt(max(norm2 - 2 * inner + float(np.sum(np.prod(grams, axis=0))), 0.0) / norm2)
        _balance(factors)
        if abs(previous - error) < tol:
            return _ALSRun(factors, error, sweep, "tol")
        if deadline is not None and time.perf_counter() > deadline:
            return _ALSRun(factors, error, sweep, "time_limit")
    return _ALSRun(factors, error, sweeps, "n_iter_max")


def _balance(factors: list[np.ndarray]) -> None:
    """Rescale in place so every factor's column r has the same norm (the model is unchanged)."""
    norms = np.stack([np.linalg.norm(factor, axis=0) for factor in factors])
    nonzero = np.all(norms > 0, axis=0)
    target = np.exp(np.mean(np.log(np.where(nonzero, norms, 1.0)), axis=0))
    for factor, norm in zip(factors, norms, strict=True):
        factor *= np.where(nonzero, target / np.where(nonzero, norm, 1.0), 1.0)


def _init_svd(core: np.ndarray, rank: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Leading mode singular vectors, random normal columns where a mode is shorter than R."""
    factors = []
    for mode, size in enumerate(core.shape):
        factor = np.empty((size, rank))
        known = min(size, rank)
        factor[:, :known] = mode_basis(core, mode, known)[1]
        factor[:, known:] = rng.standard_normal((size, rank - known)) / math.sqrt(size)
        factors.append(factor)
    return factors


def _init_gevd(core: np.ndarray, rank: int, rng: np.random.Generator) -> list[np.ndarray] | None:
    """Algebraic init from a generalized eigendecomposition of two mixed slices.

    For ``core [R, R, m..]`` of CP rank R, two random mixtures of the frontal slices are
    ``Ca = F0 diag(a) F1^T`` and ``Cb = F0 diag(b) F1^T``, so ``Ca Cb^-1 = F0 diag(a / b) F0^-1``
    gives F0 as eigenvectors; F1 follows from Cb, the small modes by least squares and a
    rank-1 fit of each column. Complex pairs (not exactly rank R) contribute their real and
    imaginary parts. None when the core is not ``[R, R, ...]`` or has a single slice.
    """
    size0, size1, *small = core.shape
    slices = math.prod(small)
    if size0 != rank or size1 != rank or slices < 2:
        return None
    flat = core.reshape(rank, rank, slices)
    mixed_a = flat @ rng.standard_normal(slices)
    mixed_b = flat @ rng.standard_normal(slices)
    values, vectors = np.linalg.eig(mixed_a @ np.linalg.pinv(mixed_b))
    columns = []
    for value, vector in zip(values, vectors.T, strict=True):
        if value.imag == 0:
            columns.append(vector.real)
        elif value.imag > 0:
            columns.extend((vector.real, vector.imag))
    factor0 = np.stack(columns, axis=1)
    factor1 = (np.linalg.pinv(factor0) @ mixed_b).T
    rhs = np.einsum("tsp,tr,sr->pr", flat, factor0, factor1)
    joint = _solve((factor0.T @ factor0) * (factor1.T @ factor1), rhs)  # [prod(m), R]
    return [factor0, factor1, *_rank_one_columns(joint, small)]


def _rank_one_columns(joint: np.ndarray, small: Sequence[int]) -> list[np.ndarray]:
    """Split each column of ``joint [prod(m), R]`` into a rank-1 tensor ``m1 x .. x mM`` (HOSVD)."""
    rank = joint.shape[1]
    if len(small) == 1:
        return [joint]
    columns = np.moveaxis(joint.reshape(*small, rank), -1, 0)  # [R, m1..mM]
    factors = []
    for mode, size in enumerate(small):
        unfolded = np.moveaxis(columns, mode + 1, 1).reshape(rank, size, -1)
        factors.append(np.linalg.svd(unfolded, full_matrices=False)[0][:, :, 0].T)  # [size, R]
    scale = columns
    for factor in factors:
        scale = np.einsum("rk...,kr->r...", scale, factor)
    factors[0] = factors[0] * scale
    return factors
