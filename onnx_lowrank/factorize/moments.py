"""Calibration statistics of a layer's input vectors: im2col patches and their second moments.

Notation. A Conv with kernel ``W [T, S/g, k1..kN]`` and g groups sees, at each output position,
one im2col *patch* per group: ``p`` of group i is the vector of group i's input channels under
the kernel footprint, flattened channel-major ``(s, k1..kN)``, of length ``D = (S/g)*prod(k)``;
with the lowered group weight ``W_i [T/g, D]`` the output is ``y = W_i p`` (before the bias).
A Gemm/MatMul ``x @ W`` is the case ``D = K``, one group, ``W_i = W^T``.

``p`` is the patch of the ORIGINAL model's input to the layer; ``p~`` that of the input the
layer sees in the already-compressed model (sequential fitting; ``p~ = p`` when layers are
fitted independently). The data-aware fits (`whiten`, `refit`) rest on the NON-centred second
moments

    Sxx = E[p p^T],   Stt = E[p~ p~^T],   Sxt = E[p p~^T]      (D x D per group)

accumulated in float64 by :class:`Moments` from the chunks :func:`iter_patches` yields, so that
``E||W p - W' p~||^2 = tr(W Sxx W^T) - 2 tr(W Sxt W'^T) + tr(W' Stt W'^T)`` includes the means.

This module never imports onnx; it is deterministic (no random numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import check_int, fmt_shape, leading_eigh
from .linalg import regression_target, solve_spd, whitened_svd
from .patches import DEFAULT_MAX_ROWS, iter_patches

__all__ = ["Moments", "SampleMoments", "conv_moments"]



# ----------------------------------------------------------------------------- moments


@dataclass(eq=False)
class Moments:
    """Streaming non-centred second moments of patches ``p`` and (optionally) paired ``p~``, per group.

    Accumulates, in float64, over all rows added so far (count ``n``):
    ``sum_x = Σ p``, ``xx = Σ p p^T``, and when a ``p~`` was ever given
    ``sum_t = Σ p~``, ``tt = Σ p~ p~^T``, ``xt = Σ p p~^T`` (each ``[groups, D]`` or
    ``[groups, D, D]``). Unpaired (``p~ = p`` everywhere) only ``xx`` and ``sum_x`` are kept and
    ``sum_t``/``tt``/``xt`` are None; the properties then fall back to the x moments. A chunk
    added without ``p~`` to a paired accumulator counts as ``p~ = p`` (and vice versa). Memory is
    ``O(groups * D^2)``, independent of the number of rows. An empty ``Moments()`` takes its
    groups and D from the first chunk.
    """

    n: int = 0
    sum_x: np.ndarray | None = None
    xx: np.ndarray | None = None
    sum_t: np.ndarray | None = None
    tt: np.ndarray | None = None
    xt: np.ndarray | None = None

    def add(self, p: np.ndarray, p_tilde: np.ndarray | None = None) -> None:
        """Accumulate a chunk of patches ``p [groups, n, D]`` (``[n, D]``: one group) and their ``p~``.

        ``xx += p^T p`` per group (float64), likewise ``tt += p~^T p~`` and ``xt += p^T p~``.

        Raises:
            ValueError: a shape that does not match earlier chunks or ``p``, or NaN/Inf values.
        """
        p64 = _chunk("Moments.add", "p", p)
        t64 = None if p_tilde is None else _chunk("Moments.add", "p_tilde", p_tilde)
        if t64 is not None and t64.shape != p64.shape:
            raise ValueError(f"Moments.add: p_tilde {fmt_shape(t64.shape)} does not match p {fmt_shape(p64.shape)}")
        groups, _, dim = p64.shape
        if self.xx is None:
            self.sum_x = np.zeros((groups, dim))
            self.xx = np.zeros((groups, dim, dim))
        elif self.xx.shape[:2] != (groups, dim):
            raise ValueError(
                f"Moments.add: a chunk of {groups} groups x {dim} values does not match the "
                f"accumulated {self.groups} groups x {self.dim}"
            )
        if t64 is not None and self.tt is None:
            self.sum_t, self.tt, self.xt = self.sum_x.copy(), self.xx.copy(), self.xx.copy()
        p_t = p64.transpose(0, 2, 1)
        gram = np.matmul(p_t, p64)
        self.xx += gram
        self.sum_x += p64.sum(axis=1)
        if self.tt is not None:
            if t64 is None:
                self.tt += gram
                self.xt += gram
                self.sum_t += p64.sum(axis=1)
            else:
                self.tt += np.matmul(t64.transpose(0, 2, 1), t64)
                self.xt += np.matmul(p_t, t64)
                self.sum_t += t64.sum(axis=1)
        self.n += p64.shape[1]

    #: Dense ``D x D`` matrices (`SampleMoments` keeps the vectors instead).
    dense = True

    @property
    def groups(self) -> int:
        """Number of groups (0 before the first chunk)."""
        return 0 if self.xx is None else self.xx.shape[0]

    @property
    def dim(self) -> int:
        """Patch length D (0 before the first chunk)."""
        return 0 if self.xx is None else self.xx.shape[1]

    @property
    def paired(self) -> bool:
        """Whether a ``p~`` was given (sequential statistics); False means ``p~ = p``."""
        return self.tt is not None

    def _mean(self, total: np.ndarray | None) -> np.ndarray:
        if self.n == 0 or total is None:
            raise ValueError("Moments: no patches were added")
        return total / self.n

    @property
    def mean_x(self) -> np.ndarray:
        """``E[p]``, ``[groups, D]``."""
        return self._mean(self.sum_x)

    @property
    def mean_t(self) -> np.ndarray:
        """``E[p~]``, ``[groups, D]`` (``E[p]`` when unpaired)."""
        return self._mean(self.sum_t if self.paired else self.sum_x)

    @property
    def cov_xx(self) -> np.ndarray:
        """``E[p p^T]`` (non-centred), ``[groups, D, D]``."""
        return self._mean(self.xx)

    @property
    def cov_tt(self) -> np.ndarray:
        """``E[p~ p~^T]`` (non-centred), ``[groups, D, D]`` (``cov_xx`` when unpaired)."""
        return self._mean(self.tt if self.paired else self.xx)

    @property
    def cov_xt(self) -> np.ndarray:
        """``E[p p~^T]`` (non-centred), ``[groups, D, D]`` (``cov_xx`` when unpaired)."""
        return self._mean(self.xt if self.paired else self.xx)

    def group(self, index: int, centered: bool = False) -> _GroupStats:
        """Group ``index``'s ``(mean_x, mean_t, Sxx, Stt, Sxt)`` (divided by n); centred on request.

        Centred: ``Sxx - mx mx^T``, ``Stt - mt mt^T``, ``Sxt - mx mt^T`` (covariances proper).
        """
        if self.n == 0 or self.xx is None:
            raise ValueError("Moments: no patches were added")
        mean_x = self.sum_x[index] / self.n
        xx = self.xx[index] / self.n
        if self.paired:
            mean_t, tt, xt = self.sum_t[index] / self.n, self.tt[index] / self.n, self.xt[index] / self.n
        else:
            mean_t, tt, xt = mean_x, xx, xx
        if centered:
            xx = xx - np.outer(mean_x, mean_x)
            tt = tt - np.outer(mean_t, mean_t)
            xt = xt - np.outer(mean_x, mean_t)
        return _GroupStats(mean_x, mean_t, xx, tt, xt, self.paired)


@dataclass(frozen=True)
class _GroupStats:
    """One group's dense second moments (`Moments.group`), and the products the fits need."""

    mean_x: np.ndarray
    mean_t: np.ndarray
    xx: np.ndarray
    tt: np.ndarray
    xt: np.ndarray
    paired: bool

    def target(self, M: np.ndarray, eps: float) -> np.ndarray:
        """The map to fit: ``M`` itself (``p~ = p``), or the regression target
        ``(M Sxt + λM)(Stt + λI)^-1`` (`linalg.regression_target`) of sequential moments."""
        return regression_target(M, self.xt, self.tt, eps=eps) if self.paired else M

    def whitened(self, M: np.ndarray, rank: int, eps: float, columns: slice = slice(None)):
        """`linalg.whitened_svd` of ``M`` under ``Stt`` (restricted to `columns`): ``(A, B, values)``."""
        return whitened_svd(M, self.tt[columns, columns], rank, eps=eps)

    def cross(self, W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(H Stt Hᵀ, W Sxt Hᵀ)``: the Gram matrix and right-hand side of a last-stage refit."""
        return H @ self.tt @ H.T, W @ self.xt @ H.T


class SampleMoments:
    """The same statistics as `Moments`, kept as the input vectors themselves (sample space).

    For a layer whose input dimension D exceeds the number n of vectors it sees (a dense head
    after a flatten: one 25088-wide vector per sample), ``D x D`` moments cost ``D² · 8`` bytes
    and say no more than the ``n x D`` vectors, which cost ``n · D · 8``. Every fit then works
    with products of the vectors (Gram matrices ``n x n`` and maps ``m x n``, m the layer's
    outputs) and gives the result of the dense form to rounding. `capacity` bounds the vectors
    kept (per group, paired with their ``p~``); `add` refuses more.
    """

    dense = False

    def __init__(self, capacity: int):
        self.capacity = check_int("SampleMoments", "capacity", capacity)
        self._x: list[np.ndarray] = []
        self._t: list[np.ndarray] = []
        self.n = 0

    @property
    def room(self) -> int:
        """How many more vectors `add` accepts."""
        return self.capacity - self.n

    def add(self, p: np.ndarray, p_tilde: np.ndarray | None = None) -> None:
        """Keep a chunk of vectors ``p [groups, n, D]`` (and their ``p~``) in float64."""
        p64 = _chunk("SampleMoments.add", "p", p)
        t64 = p64 if p_tilde is None else _chunk("SampleMoments.add", "p_tilde", p_tilde)
        if t64.shape != p64.shape:
            raise ValueError(f"SampleMoments.add: p_tilde {fmt_shape(t64.shape)} does not match p {fmt_shape(p64.shape)}")
        if self._x and self._x[0].shape[::2] != p64.shape[::2]:
            raise ValueError(f"SampleMoments.add: a chunk of {p64.shape[0]} groups x {p64.shape[2]} values does not "
                             f"match the kept {self.groups} groups x {self.dim}")
        if self.n + p64.shape[1] > self.capacity:
            raise ValueError(f"SampleMoments.add: {self.n + p64.shape[1]} vectors exceed the capacity {self.capacity}")
        self._x.append(p64)
        self._t.append(t64 if p_tilde is not None else None)
        self.n += p64.shape[1]

    @property
    def groups(self) -> int:
        return self._x[0].shape[0] if self._x else 0

    @property
    def dim(self) -> int:
        return self._x[0].shape[2] if self._x else 0

    @property
    def paired(self) -> bool:
        return any(t is not None for t in self._t)

    def _stacked(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([chunk[index] for chunk in self._x])
        t = np.concatenate([x_chunk[index] if t_chunk is None else t_chunk[index]
                            for x_chunk, t_chunk in zip(self._x, self._t, strict=True)]) if self.paired else x
        return x, t

    @property
    def mean_x(self) -> np.ndarray:
        return np.stack([sum(chunk[g].sum(axis=0) for chunk in self._x) / self.n for g in range(self.groups)])

    @property
    def mean_t(self) -> np.ndarray:
        return np.stack([self._stacked(g)[1].mean(axis=0) for g in range(self.groups)])

    def group(self, index: int, centered: bool = False) -> _SampleGroup:
        """Group ``index``'s vectors (centred on request: then the products are covariances)."""
        if self.n == 0:
            raise ValueError("SampleMoments: no vectors were added")
        x, t = self._stacked(index)
        mean_x, mean_t = x.mean(axis=0), t.mean(axis=0)
        if centered:
            x, t = x - mean_x, t - mean_t
        return _SampleGroup(mean_x, mean_t, x, t, self.paired)


@dataclass(frozen=True)
class _SampleGroup:
    """One group's vectors ``X`` (original) and ``T`` (compressed world; ``T = X`` unpaired), n x D.

    The dense forms' matrices are ``Sxx = XᵀX/n``, ``Stt = TᵀT/n``, ``Sxt = XᵀT/n``; each product
    below is computed without them.
    """

    mean_x: np.ndarray
    mean_t: np.ndarray
    x: np.ndarray
    t: np.ndarray
    paired: bool

    def _ridge(self, t: np.ndarray, eps: float) -> float:
        """`linalg.regularized`'s ridge ``eps · tr(Stt) / D`` (``eps`` when the trace is 0)."""
        scale = float(np.sum(t * t)) / t.shape[0] / t.shape[1]
        return eps * (scale if scale > 0 else 1.0)

    def target(self, M, eps):
        """``W* = (M Sxt + λM)(Stt + λI)^-1`` by Woodbury: ``(Stt + λI)^-1 = (I - Tᵀ(nλI + TTᵀ)^-1 T)/λ``."""
        if not self.paired:
            return M
        n = self.t.shape[0]
        lam = self._ridge(self.t, eps)
        rhs = (M @ self.x.T) @ self.t / n + lam * M
        gram = self.t @ self.t.T
        gram[np.diag_indices(n)] += n * lam
        return (rhs - solve_spd("SampleMoments.target", gram, rhs @ self.t.T) @ self.t) / lam

    def whitened(self, M, rank, eps, columns=slice(None)):
        """The whitened SVD from ``G = M (Stt + λI) Mᵀ`` (``m x m``): ``A = U_r S_r^½``,
        ``B = S_r^-½ U_rᵀ M``, the product `linalg.whitened_svd` gives (its left factors are the
        eigenvectors of G whatever the square root of ``Stt + λI``)."""
        t = self.t[:, columns]
        M = np.asarray(M, dtype=np.float64)
        lam = self._ridge(t, eps)
        projected = t @ M.T
        values, vectors = leading_eigh(projected.T @ projected / t.shape[0] + lam * (M @ M.T), rank)
        singular = np.sqrt(values[: min(M.shape[0], t.shape[1])])
        root = np.sqrt(singular[:rank])
        inverse = np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
        return vectors * root, (vectors.T @ M) * inverse[:, None], singular

    def cross(self, W, H):
        """``(H Stt Hᵀ, W Sxt Hᵀ)`` from ``T Hᵀ`` and ``X Wᵀ``."""
        n = self.t.shape[0]
        th = self.t @ H.T
        return th.T @ th / n, (self.x @ W.T).T @ th / n


def _chunk(method: str, name: str, array: object) -> np.ndarray:
    """Validate a patch chunk ``[groups, n, D]`` (or ``[n, D]``) and return it as float64."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{method}: expected {name} as a numpy array, found {type(array).__name__}")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"{method}: expected {name} as a float array [groups, n, D], found {array.dtype} {fmt_shape(array.shape)}"
        )
    out = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{method}: {name} holds NaN or Inf values")
    return out


def conv_moments(
    x: np.ndarray,
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    groups: int = 1,
    x_tilde: np.ndarray | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    moments: Moments | None = None,
) -> Moments:
    """Accumulate the patch moments of a Conv input (and the paired compressed-model input).

    Streams :func:`iter_patches` of ``x`` (and of ``x_tilde``, same shape) into ``moments``
    (a new :class:`Moments` when None) and returns it; call it once per calibration batch.
    """
    if x_tilde is not None and (not isinstance(x_tilde, np.ndarray) or getattr(x, "shape", None) != x_tilde.shape):
        raise ValueError("conv_moments: x_tilde must be an array of the same shape as x")
    moments = Moments() if moments is None else moments
    chunks = iter_patches(x, kernel_shape, strides, dilations, pads, groups, max_rows)
    if x_tilde is None:
        for chunk in chunks:
            moments.add(chunk)
    else:
        tilde = iter_patches(x_tilde, kernel_shape, strides, dilations, pads, groups, max_rows)
        for chunk, chunk_t in zip(chunks, tilde, strict=True):
            moments.add(chunk, chunk_t)
    return moments
