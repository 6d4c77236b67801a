"""Rank policies and error curves: how many components a layer keeps, and what that costs in error.

A policy maps a layer's full ranks (one per factorized mode, per group; see `methods.full_ranks`)
to the ranks to keep: ``policy.ranks(full, spectra=None)``. The fixed policies (`FixedRank`,
`RankRatio`) look only at `full`; the spectral ones (`Energy`, `VBMF`) read each mode's singular
values, given as one `ModeSpectrum` per mode. A grouped layer (g > 1) is factored with the same
rank in every group, so a spectral policy pools the groups: `Energy` sums the squared singular
values of all groups at each rank, `VBMF` fits one noise variance to all groups.

The global budget (`allocation.allocate`) reads its errors from `svd_error_curve` /
`tucker_error_curve` (relative squared error, comparable across layers) on rank grids from
`rank_grid`; `snap` aligns a single rank to the multiples of 16 that
onnxruntime's CPU kernels want (latency is a staircase in ``ceil(r / 16)``).

Everything here is numpy on plain arrays: no graph, no onnx.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "Snapped",
    "VBMF",
    "Energy",
    "FixedRank",
    "ModeSpectrum",
    "RankPolicy",
    "RankRatio",
    "VBMFEstimate",
    "evbmf",
    "rank_grid",
    "snap",
    "svd_error_curve",
    "tucker_error_curve",
]

_ENERGY_RTOL = 1e-12  # cumulative sums of squares are compared with this much rounding slack


# ----------------------------------------------------------------------------------------------
# Spectra


@dataclasses.dataclass(frozen=True)
class ModeSpectrum:
    """The singular values of one factorized mode's unfolding, one array per group.

    Attributes:
        values: one 1-D array per group: the singular values of that group's ``L x M``
            unfolding, descending, non-negative (a single array is taken as one group). Pass all
            ``min(L, M)`` of them; missing trailing values count as zeros.
        shape: ``(L, M)``, the unfolding's shape for ONE group.
    """

    values: tuple[np.ndarray, ...]
    shape: tuple[int, int]

    def __post_init__(self):
        values = self.values
        if isinstance(values, np.ndarray):
            values = (values,)
        arrays = []
        for g, v in enumerate(values):
            v = np.asarray(v, dtype=np.float64)
            if v.ndim != 1 or v.size == 0:
                raise ValueError(f"group {g}: expected a non-empty 1-D array of singular values, "
                                 f"got shape {v.shape}")
            if not np.all(np.isfinite(v)) or np.any(v < 0):
                raise ValueError(f"group {g}: singular values must be finite and non-negative, "
                                 f"got min {v.min()}")
            arrays.append(np.sort(v)[::-1].copy())
        if not arrays:
            raise ValueError("expected at least one group of singular values, got none")
        if len({a.size for a in arrays}) != 1:
            raise ValueError(f"every group must have as many singular values, got "
                             f"{[a.size for a in arrays]}")
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"shape must be (L, M) with L, M >= 1, got {self.shape}")
        shape = (int(self.shape[0]), int(self.shape[1]))
        if arrays[0].size > min(shape):
            raise ValueError(f"an {shape[0]}x{shape[1]} unfolding has at most {min(shape)} "
                             f"singular values, got {arrays[0].size}")
        object.__setattr__(self, "values", tuple(arrays))
        object.__setattr__(self, "shape", shape)

    @property
    def groups(self) -> int:
        """The number of groups."""
        return len(self.values)

    def pooled_energy(self) -> np.ndarray:
        """``E[i] = Σ_g σ_{g,i}²``: the squared singular values summed over groups, per index."""
        return np.sum(np.square(np.stack(self.values)), axis=0)


def _as_values(values) -> tuple[np.ndarray, ...]:
    if isinstance(values, ModeSpectrum):
        return values.values
    if isinstance(values, np.ndarray):
        values = (values,)
    arrays = tuple(np.asarray(v, dtype=np.float64).ravel() for v in values)
    if not arrays:
        raise ValueError("expected at least one group of singular values, got none")
    return arrays


def _discarded_energy(values, ranks) -> tuple[np.ndarray, float]:
    """``(Σ_g Σ_{i >= r} σ_{g,i}²  for r in ranks,  Σ_g Σ_i σ_{g,i}²)``."""
    arrays = _as_values(values)
    n = max(a.size for a in arrays)
    energy = np.zeros(n + 1)
    for a in arrays:
        a = np.sort(np.abs(a))[::-1]
        energy[: a.size] += np.square(a)
    # tail[r] = Σ_{i >= r} energy[i], summed from the small end for accuracy; tail[n] = 0.
    tail = np.cumsum(energy[::-1])[::-1]
    ranks = np.asarray(ranks, dtype=np.int64)
    if np.any(ranks < 0):
        raise ValueError(f"ranks must be non-negative, got {ranks.min()}")
    return tail[np.minimum(ranks, n)], float(tail[0])


def svd_error_curve(values, ranks: Sequence[int]) -> np.ndarray:
    """Relative squared error of rank-r truncated SVD at each rank r, groups pooled.

    By Eckart–Young the best rank-r approximation of each group's matrix drops exactly its
    trailing singular values, so with the same rank r in every group g::

        err(r) = Σ_g Σ_{i >= r} σ_{g,i}²  /  Σ_g Σ_i σ_{g,i}²  =  ||W - W_r||_F² / ||W||_F²

    Args:
        values: one array of singular values per group (or a single array, or a `ModeSpectrum`).
        ranks: the ranks to evaluate (0 gives 1, ranks past the last value give 0).

    Returns:
        float64 array, one relative error per rank, in [0, 1]; all zeros for a zero matrix.
    """
    tail, total = _discarded_energy(values, ranks)
    if total <= 0:
        return np.zeros(tail.shape)
    return np.clip(tail / total, 0.0, 1.0)


def tucker_error_curve(mode_t, mode_s, ranks_pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """HOSVD bound on the relative squared error of Tucker-2 at each rank pair ``(r_t, r_s)``.

    Truncating the HOSVD of a tensor W to ranks ``(r_t, r_s)`` in its output- and input-channel
    modes errs by at most the discarded energy of both unfoldings (De Lathauwer et al., "A
    multilinear singular value decomposition", SIAM J. Matrix Anal. Appl. 2000, property 10)::

        ||W - Ŵ||_F² <= Σ_{i >= r_t} σ_i(W_(t))² + Σ_{j >= r_s} σ_j(W_(s))²

    divided here by ``||W||_F²`` (every unfolding has the same Frobenius norm; the mean of the two
    modes' totals is used) and clipped to 1. Groups are pooled as in `svd_error_curve`.

    Args:
        mode_t, mode_s: singular values of the output- and input-mode unfoldings, one array per
            group (or `ModeSpectrum`s).
        ranks_pairs: the ``(r_t, r_s)`` pairs to evaluate.

    Returns:
        float64 array of relative errors in [0, 1], one per pair.
    """
    pairs = np.asarray(ranks_pairs, dtype=np.int64).reshape(-1, 2)
    tail_t, total_t = _discarded_energy(mode_t, pairs[:, 0])
    tail_s, total_s = _discarded_energy(mode_s, pairs[:, 1])
    total = 0.5 * (total_t + total_s)
    if total <= 0:
        return np.zeros(len(pairs))
    return np.clip((tail_t + tail_s) / total, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Rank grids


def rank_grid(full: int, multiple: int) -> list[int]:
    """The ranks a budget may pick: ``multiple, 2·multiple, ... < full``, then `full` itself.

    ``rank_grid(40, 16) == [16, 32, 40]``; ``rank_grid(10, 16) == [10]``; ``rank_grid(4, 1)
    == [1, 2, 3, 4]``.
    """
    full, multiple = _check_positive(full, "full"), _check_positive(multiple, "multiple")
    return [*range(multiple, full, multiple), full]


def snap(rank: int, multiple: int, full: int) -> int:
    """Round `rank` to the nearest multiple of `multiple` (ties up), within ``[multiple, full]``.

    ``r' = min(full, max(multiple, multiple · floor(rank / multiple + 1/2)))``; when
    ``full < multiple`` the answer is `full` (no aligned rank exists below the full one).
    onnxruntime's CPU convolutions run in 16-channel blocks, so any rank between 16m and 16(m+1)
    costs about as much as 16(m+1) (docs: latency-cpu.md, finding 1).
    """
    multiple, full = _check_positive(multiple, "multiple"), _check_positive(full, "full")
    if int(rank) != rank or rank < 0:
        raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
    if full < multiple:
        return full
    rounded = multiple * ((2 * int(rank) + multiple) // (2 * multiple))
    return min(full, max(multiple, rounded))


def _check_positive(value, name: str) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# Policies


@dataclasses.dataclass(frozen=True)
class FixedRank:
    """Keep `rank` components in every mode, capped at the mode's full rank."""

    rank: int
    uses_spectra = False

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")

    def ranks(self, full: tuple[int, ...], spectra: tuple[ModeSpectrum, ...] | None = None
              ) -> tuple[int, ...]:
        """``r_i = min(rank, full_i)``; `spectra` is ignored."""
        return tuple(min(self.rank, f) for f in full)



@dataclasses.dataclass(frozen=True)
class RankRatio:
    """Keep `ceil(ratio · full)` components in every mode (at least 1)."""

    ratio: float
    uses_spectra = False

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"rank ratio must be in (0, 1], got {self.ratio}")

    def ranks(self, full: tuple[int, ...], spectra: tuple[ModeSpectrum, ...] | None = None
              ) -> tuple[int, ...]:
        """``r_i = max(1, min(full_i, ceil(ratio · full_i)))``; `spectra` is ignored."""
        return tuple(max(1, min(f, math.ceil(self.ratio * f - 1e-9))) for f in full)



@dataclasses.dataclass(frozen=True)
class Snapped:
    """Another policy's ranks rounded to multiples of `multiple` (see `snap`): aligned ranks run
    faster in onnxruntime's blocked convolutions (latency-cpu.md, finding 1)."""

    policy: object
    multiple: int

    def ranks(self, full: tuple[int, ...], spectra: tuple[ModeSpectrum, ...] | None = None
              ) -> tuple[int, ...]:
        """``snap(r_i, multiple, full_i)`` for the inner policy's ``r_i``."""
        inner = self.policy.ranks(full, spectra)
        return tuple(snap(r, self.multiple, f) for r, f in zip(inner, full, strict=True))



def _check_spectra(policy: str, full, spectra) -> tuple[ModeSpectrum, ...]:
    if spectra is None:
        raise ValueError(f"{policy} needs the singular values of each factorized mode, got none")
    spectra = tuple(spectra)
    if len(spectra) != len(full):
        raise ValueError(f"{policy}: expected one spectrum per mode ({len(full)}), "
                         f"got {len(spectra)}")
    for i, s in enumerate(spectra):
        if not isinstance(s, ModeSpectrum):
            raise TypeError(f"{policy}: mode {i}: expected a ModeSpectrum, got {type(s).__name__}")
    return spectra


@dataclasses.dataclass(frozen=True)
class Energy:
    """Keep the fewest components holding at least `fraction` of each mode's energy.

    With ``E(r) = Σ_g Σ_{i < r} σ_{g,i}²`` (squared singular values of the mode's unfolding,
    summed over the groups at each rank), mode i keeps

        ``r_i = min{ r >= 1 : E(r) >= fraction · E(n) }``, capped at ``full_i``,

    i.e. the truncated SVD of that unfolding keeps ``>= fraction`` of ``||W||_F²``.
    """

    fraction: float

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"energy fraction must be in (0, 1], got {self.fraction}")

    def ranks(self, full: tuple[int, ...], spectra: tuple[ModeSpectrum, ...] | None = None
              ) -> tuple[int, ...]:
        """The energy rank of every mode (see the class docstring); `spectra` is required."""
        spectra = _check_spectra("Energy", full, spectra)
        out = []
        for f, spectrum in zip(full, spectra):
            kept = np.cumsum(spectrum.pooled_energy())
            total = kept[-1]
            if total <= 0:
                out.append(1)
                continue
            need = self.fraction * total * (1 - _ENERGY_RTOL)
            r = int(np.searchsorted(kept, need, side="left")) + 1
            out.append(max(1, min(f, r)))
        return tuple(out)



@dataclasses.dataclass(frozen=True)
class VBMFEstimate:
    """What `evbmf` found for one mode.

    Attributes:
        rank: components kept (same for every group), at least 1.
        sigma2: the estimated noise variance σ² (per entry of the unfolding).
        threshold: the EVB threshold γ̲ on singular values; components above it survive.
        counts: per group, how many singular values exceed the threshold (may be 0).
    """

    rank: int
    sigma2: float
    threshold: float
    counts: tuple[int, ...]


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """``τ(x; α) = ½ (x - (1+α) + sqrt((x - (1+α))² - 4α))``, for ``x >= (1+√α)²``."""
    b = x - (1 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4 * alpha, 0.0)))


def _psi1(tau: np.ndarray, alpha: float) -> np.ndarray:
    """``ψ1 = log(τ+1) + α log(τ/α + 1) - τ``: free-energy change of keeping a component."""
    return np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau


def _tau_bar(alpha: float) -> float:
    """The unique positive zero τ̲ of ``log(τ+1) + α log(τ/α+1) - τ`` (2.5129 at α = 1)."""
    lo, hi = 0.0, 4.0
    while _psi1(np.float64(hi), alpha) > 0:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _psi1(np.float64(mid), alpha) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def evbmf(spectrum: ModeSpectrum) -> VBMFEstimate:
    """Empirical variational Bayesian matrix factorization (EVBMF) rank of one mode.

    Nakajima, Sugiyama, Babacan & Tomioka, "Global analytic solution of fully-observed
    variational Bayesian matrix factorization", JMLR 14 (2013) (the empirical VB solution),
    with the noise-variance interval of Nakajima, Tomioka, Sugiyama & Babacan,
    "Condition for perfect dimensionality recovery by variational Bayesian PCA", JMLR 16 (2015).
    Used on each mode's unfolding as in Kim et al., "Compression of deep convolutional neural
    networks for fast and low power mobile applications", ICLR 2016.

    For an ``L x M`` matrix (transposed so that ``L <= M``), ``α = L/M``, singular values
    ``γ_1 >= ... >= γ_L`` and noise variance σ², write ``x_h = γ_h² / (M σ²)`` and let τ̲ be the
    positive zero of ``ψ1(τ) = log(τ+1) + α log(τ/α + 1) - τ`` (τ̲ ≈ 2.5129 √α). A component
    survives EVB iff ``x_h > x̄ = (1 + τ̲)(1 + α/τ̲)``, i.e. iff

        ``γ_h > γ̲ = σ sqrt(M (1 + τ̲)(1 + α/τ̲))``.

    σ² minimises the (scaled) empirical free energy

        ``Ω(σ²) = Σ_h x_h + L log σ² + Σ_{h: x_h > x̄} ψ1(τ(x_h))``,
        ``τ(x) = ½ (x - (1+α) + sqrt((x - (1+α))² - 4α))``

    (the paper's ``Σ_h ψ0(x_h) + θ(x_h > x̄) ψ1(x_h)`` with ``ψ0(x) = x - log x``, up to a
    constant), over ``[σ̲², σ̄²]`` with ``σ̄² = Σ_h γ_h² / (L M)``,
    ``σ̲² = max(γ_{H̄+1}² / (M x̄), Σ_{h > H̄} γ_h² / (M (L - H̄)))`` and
    ``H̄ = ceil(L / (1+α)) - 1`` (EVB keeps at most H̄ components). Ω is continuous
    (``ψ1(τ̲) = 0``) but not convex, so it is scanned on 512 log-spaced points and refined by
    golden section around the best one (a bounded local search can stop in a side minimum):
    deterministic, no seed. τ̲ is solved for by bisection rather than taken as 2.5129 √α,
    which is exact only at α = 1.

    Groups share one σ²: Ω is summed over them (the interval is the union of theirs), every group
    is thresholded at the same γ̲, and the common rank is the mean count rounded up, at least 1.
    """
    L, M = sorted(spectrum.shape)
    alpha = L / M
    gammas = np.zeros((spectrum.groups, L))
    for g, v in enumerate(spectrum.values):
        gammas[g, : v.size] = v
    sq = np.square(gammas)
    totals = sq.sum(axis=1)
    if not np.any(totals > 0):
        return VBMFEstimate(1, 0.0, 0.0, (0,) * spectrum.groups)
    tau_bar = _tau_bar(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    h_bar = max(0, min(math.ceil(L / (1 + alpha)) - 1, L - 1))
    upper = float(np.max(totals / (L * M)))
    lowers = np.maximum(sq[:, h_bar] / (M * x_bar), sq[:, h_bar:].mean(axis=1) / M)
    lower = float(np.min(lowers))
    tiny = upper * 1e-30
    lower = min(max(lower, tiny), upper)

    flat = sq.ravel()
    energy = float(flat.sum())
    n_groups = spectrum.groups

    def objective(log_s2: np.ndarray) -> np.ndarray:
        s2 = np.exp(log_s2)[:, None]
        x = flat[None, :] / (M * s2)
        keep = x > x_bar
        psi = np.where(keep, _psi1(_tau(np.where(keep, x, x_bar), alpha), alpha), 0.0)
        return energy / (M * s2[:, 0]) + n_groups * L * log_s2 + psi.sum(axis=1)

    a, b = math.log(lower), math.log(upper)
    if b - a < 1e-12:
        log_s2 = b
    else:
        grid = np.linspace(a, b, 512)
        i = int(np.argmin(objective(grid)))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
        golden = (math.sqrt(5) - 1) / 2
        c, d = hi - golden * (hi - lo), lo + golden * (hi - lo)
        fc, fd = objective(np.array([c, d]))
        for _ in range(100):
            if hi - lo < 1e-12:
                break
            if fc <= fd:
                hi, d, fd = d, c, fc
                c = hi - golden * (hi - lo)
                fc = objective(np.array([c]))[0]
            else:
                lo, c, fc = c, d, fd
                d = lo + golden * (hi - lo)
                fd = objective(np.array([d]))[0]
        log_s2 = 0.5 * (lo + hi)
        if objective(np.array([grid[i]]))[0] < objective(np.array([log_s2]))[0]:
            log_s2 = grid[i]
    sigma2 = math.exp(log_s2)
    threshold = math.sqrt(M * sigma2 * x_bar)
    counts = tuple(int(np.count_nonzero(row > threshold)) for row in gammas)
    rank = max(1, math.ceil(sum(counts) / n_groups))
    return VBMFEstimate(rank, sigma2, threshold, counts)


@dataclasses.dataclass(frozen=True)
class VBMF:
    """Keep, in every mode, the components that empirical VBMF tells apart from noise.

    Each mode's rank is `evbmf` of its unfolding's singular values (the count of singular values
    above the EVB threshold ``σ sqrt(M (1+τ̲)(1+α/τ̲))`` with σ² estimated from the spectrum
    itself), at least 1 and at most the mode's full rank. Kim et al. (ICLR 2016) use it to pick
    Tucker-2 ranks; it needs no setting.
    """

    def ranks(self, full: tuple[int, ...], spectra: tuple[ModeSpectrum, ...] | None = None
              ) -> tuple[int, ...]:
        """The EVBMF rank of every mode (see `evbmf`); `spectra` is required."""
        spectra = _check_spectra("VBMF", full, spectra)
        return tuple(max(1, min(f, evbmf(s).rank)) for f, s in zip(full, spectra))



RankPolicy = FixedRank | RankRatio | Energy | VBMF
