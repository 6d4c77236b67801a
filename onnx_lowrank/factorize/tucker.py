"""Tucker-2 and Tucker-1 factorizations of conv kernels on the two channel modes.

Kim et al. 2016, "Compression of deep convolutional neural networks for fast and low power
mobile applications": ``W ~ G x_0 U x_1 V`` with ``U [T, Rt]``, ``V [S, Rs]`` orthonormal and
the core ``G [Rt, Rs, k..]``, computed by truncated HOSVD (De Lathauwer et al. 2000) from the
eigenvectors of the mode Gram matrices, optionally refined by HOOI iterations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

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

__all__ = ["TuckerFactors", "check_tucker_ranks", "hosvd_error_bound", "tucker2", "tucker_result", "tucker_stages"]

_TF = TypeVar("_TF", bound="TuckerFactors")

# HOOI stops once an iteration raises ||G||^2 (= ||W||^2 - error^2) by less than this fraction.
HOOI_RTOL = 1e-10


@dataclass(frozen=True, eq=False)
class TuckerFactors(ConvFactors):
    """Tucker-2 (or Tucker-1) factors of a conv kernel.

    ``ranks = (Rt, Rs)`` per group; a mode that was not factored reports its full size.

    Attributes:
        mode_spectra: per group, ``(output-mode, input-mode)`` singular values of the
            unfoldings of ``W_g``, descending (for rank policies and the HOSVD bound).
        n_iter: HOOI iterations run (the largest count over the groups; 0 for plain HOSVD).
    """

    mode_spectra: tuple[tuple[np.ndarray, np.ndarray], ...]
    n_iter: int

    @property
    def error_bound(self) -> float:
        """The truncated-HOSVD bound on ``rel_error``, see :func:`hosvd_error_bound`."""
        return hosvd_error_bound(self.mode_spectra, self.ranks)


def hosvd_error_bound(
    mode_spectra: Sequence[tuple[np.ndarray, np.ndarray]], ranks: tuple[int | None, int | None]
) -> float:
    """Upper bound on the relative error of a truncated HOSVD at ``ranks = (Rt, Rs)`` per group.

    De Lathauwer, De Moor and Vandewalle 2000 (Property 10):
    ``||W - W_hat||_F^2 <= sum over the factored modes of the discarded squared mode singular
    values``, here summed over the groups and divided by ``||W||_F^2`` (the sum of the squared
    singular values of any one unfolding). HOOI started from the HOSVD only lowers the error,
    so the bound holds for it too. A rank of None (mode not factored) discards nothing.
    """
    total = 0.0
    discarded = 0.0
    for spectra in mode_spectra:
        total += float(np.sum(spectra[0] ** 2))
        for values, rank in zip(spectra, ranks, strict=True):
            if rank is not None:
                discarded += float(np.sum(values[rank:] ** 2))
    return math.sqrt(discarded / total) if total > 0 else 0.0


def tucker2(
    kernel: np.ndarray,
    ranks: tuple[int | None, int | None],
    groups: int = 1,
    n_iter_max: int = 0,
) -> TuckerFactors:
    """Tucker-2 decomposition of a conv kernel on its channel modes, per group (Kim et al. 2016).

    ``W_g[t, s, k..] ~ sum_{a, b} U[t, a] V[s, b] G[a, b, k..]`` with ``U [T/g, Rt]`` and
    ``V [S/g, Rs]`` the leading eigenvectors of the mode Gram matrices (truncated HOSVD) and
    ``G = W_g x_0 U^T x_1 V^T``; ``n_iter_max`` > 0 refines U and V by HOOI. Stages:
    ``[g*Rs, S/g, 1..]`` (V^T, group g), the core ``[g*Rt, Rs, k..]`` (group g, the original
    strides, dilations and pads), ``[T, Rt, 1..]`` (U, group g).

    Tucker-1: ``Rt=None`` keeps the output mode (method ``"tucker1-in"``: V^T then the core
    ``[T, Rs, k..]``), ``Rs=None`` keeps the input mode (method ``"tucker1-out"``: the core
    ``[g*Rt, S/g, k..]`` then U). Full ranks ``(T/g, S/g)`` are exact.

    Args:
        kernel: float array ``[T, S/g, k1..kN]``, N = 1, 2 or 3.
        ranks: ``(Rt, Rs)`` per group, each ``1..T/g`` / ``1..S/g`` or None; not both None.
        groups: the Conv's ``group`` attribute.
        n_iter_max: HOOI iterations at most (0: plain truncated HOSVD).

    Raises:
        ValueError: bad kernel, groups, ranks or n_iter_max.
    """
    method = "tucker2"
    kernel64 = check_kernel(method, kernel)
    groups = check_groups(method, groups, kernel64.shape)
    n_iter_max = check_int(method, "n_iter_max", n_iter_max, minimum=0)
    rank_out, rank_in = check_tucker_ranks(method, ranks, kernel64.shape, groups)

    def factor_one(block: np.ndarray) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray], int]:
        values_out, basis_out = mode_basis(block, 0, rank_out or 0)
        values_in, basis_in = mode_basis(block, 1, rank_in or 0)
        spectra = (values_out, values_in)
        out_basis = None if rank_out is None else basis_out
        in_basis = None if rank_in is None else basis_in
        iterations = 0
        if out_basis is not None and in_basis is not None:
            out_basis, in_basis, iterations = _hooi(block, out_basis, in_basis, n_iter_max)
        return tucker_stages(in_basis, _core(block, out_basis, in_basis), out_basis), spectra, iterations

    results = per_group(kernel64, groups, factor_one)
    return tucker_result(
        TuckerFactors,
        kernel64,
        groups,
        (rank_out, rank_in),
        [(stages, spectra) for stages, spectra, _ in results],
        n_iter=max(iterations for _, _, iterations in results),
    )


# ----------------------------------------------------------------------------- shared layout
# The HOSVD above and the data-aware fit (``data.data_tucker2``) differ only in how the bases
# and the core are computed; the rank checks, stage layout and result are built here.


def check_tucker_ranks(
    method: str, ranks: object, shape: Sequence[int], groups: int
) -> tuple[int | None, int | None]:
    """Validate ``ranks = (Rt, Rs)`` (each ``1..T/g`` / ``1..S/g`` or None, not both None) for a kernel."""
    if not isinstance(ranks, tuple | list) or len(ranks) != 2:
        raise ValueError(f"{method}: ranks must be a pair (Rt, Rs), found {ranks!r}")
    if ranks[0] is None and ranks[1] is None:
        raise ValueError(f"{method}: ranks (None, None) factor no mode; give Rt, Rs or both")
    rank_out, rank_in = (
        None if rank is None else check_rank(method, rank, full, shape, name=label, groups=groups)
        for rank, full, label in zip(ranks, (shape[0] // groups, shape[1]), ("output rank", "input rank"), strict=True)
    )
    return rank_out, rank_in


def tucker_stages(in_basis: np.ndarray | None, core: np.ndarray, out_basis: np.ndarray | None) -> list[np.ndarray]:
    """One group's chain: ``V^T [Rs, S/g, 1..]`` (input mode factored), the core, ``U [T/g, Rt, 1..]`` (output mode)."""
    ones = [1] * (core.ndim - 2)
    stages = []
    if in_basis is not None:
        stages.append(in_basis.T.reshape(in_basis.shape[1], in_basis.shape[0], *ones))
    stages.append(core)
    if out_basis is not None:
        stages.append(out_basis.reshape(*out_basis.shape, *ones))
    return stages


def tucker_result(
    cls: type[_TF],
    kernel64: np.ndarray,
    groups: int,
    ranks: tuple[int | None, int | None],
    results: Sequence[tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray]]],
    n_iter: int,
) -> _TF:
    """The ``cls`` result from per-group ``(tucker_stages, mode spectra)``; a None rank keeps its mode."""
    rank_out, rank_in = ranks
    stages = stack_groups([stages for stages, _ in results])
    if rank_out is not None and rank_in is not None:
        variant = "tucker2"
    else:
        variant = "tucker1-out" if rank_in is None else "tucker1-in"
    return build(
        cls,
        kernel64,
        method=variant,
        shape=tuple(kernel64.shape),
        ranks=(rank_out or kernel64.shape[0] // groups, rank_in or kernel64.shape[1]),
        stages=stages,
        groups_per_stage=(groups,) * len(stages),
        groups=groups,
        mode_spectra=tuple(spectra for _, spectra in results),
        n_iter=n_iter,
    )


def _core(block: np.ndarray, out_basis: np.ndarray | None, in_basis: np.ndarray | None) -> np.ndarray:
    """``G = W x_0 U^T x_1 V^T`` of a group's kernel ``[T/g, S/g, k..]`` (a None basis: mode kept)."""
    core = block
    if out_basis is not None:
        core = np.tensordot(out_basis, core, axes=(0, 0))
    if in_basis is not None:
        core = np.moveaxis(np.tensordot(core, in_basis, axes=(1, 0)), -1, 1)
    return core


def _hooi(
    block: np.ndarray, out_basis: np.ndarray, in_basis: np.ndarray, n_iter_max: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """HOOI (De Lathauwer et al. 2000): alternately refit each basis to the other's projection."""
    norm = float(np.sum(_core(block, out_basis, in_basis) ** 2))
    for iteration in range(1, n_iter_max + 1):
        projected = np.tensordot(block, in_basis, axes=(1, 0))  # [T/g, k.., Rs]
        out_basis = mode_basis(projected, 0, out_basis.shape[1])[1]
        projected = np.tensordot(block, out_basis, axes=(0, 0))  # [S/g, k.., Rt]
        in_basis = mode_basis(projected, 0, in_basis.shape[1])[1]
        previous, norm = norm, float(np.sum(_core(block, out_basis, in_basis) ** 2))
        if norm - previous <= HOOI_RTOL * previous:
            return out_basis, in_basis, iteration
    return out_basis, in_basis, n_iter_max
