"""Data-aware low-rank factorization: fit a layer's OUTPUT on calibration data, not its weights.

Notation. A Conv with kernel ``W [T, S/g, k1..kN]`` and g groups sees, at each output position,
one im2col *patch* per group: ``p`` of group i is the vector of group i's input channels under
the kernel footprint, flattened channel-major ``(s, k1..kN)``, of length ``D = (S/g)*prod(k)``;
with the lowered group weight ``W_i [T/g, D]`` the output is ``y = W_i p`` (before the bias).
A Gemm/MatMul ``x @ W`` is the case ``D = K``, one group, ``W_i = W^T``.

``p`` is the patch of the ORIGINAL model's input to the layer; ``p~`` that of the input the
layer sees in the already-compressed model (sequential fitting; ``p~ = p`` when layers are
fitted independently). Everything here rests on the NON-centred second moments

    Sxx = E[p p^T],   Stt = E[p~ p~^T],   Sxt = E[p p~^T]      (D x D per group)

accumulated in float64 by :class:`Moments` from the chunks :func:`iter_patches` yields, so that
``E||W p - W' p~||^2 = tr(W Sxx W^T) - 2 tr(W Sxt W'^T) + tr(W' Stt W'^T)`` includes the means.

The pieces (references: SVD-LLM / Zhang et al. 2015 for whitening, reduced-rank regression for
the sequential target, least squares for the refit of the last factor):

* :func:`whitened_svd`: with ``L = chol(Stt + eps I)`` the rank-r ``A B`` minimising
  ``E||M p~ - A B p~||^2`` is the truncated SVD of ``M L`` with ``B`` right-multiplied by
  ``L^-1``; :func:`regression_target` gives ``M = W* = W Sxt Stt^-1`` in sequential mode.
* :func:`whitened_channel_svd`, :func:`whitened_spatial_svd`, :func:`whitened_tiled_svd`,
  :func:`data_tucker2`: the data-aware counterparts of ``channel_svd``, ``spatial_svd``,
  ``tiled_svd`` and ``tucker2``, with the same stage layouts and result types.
* :func:`refit_last` / :func:`refit_chain` / :func:`refit_factors` / :func:`refit_matrix`:
  given the earlier stages of any chain, the last stage's weight by ridge least squares against
  the original output, and :func:`bias_shift`, the remaining mean output difference.

This module never imports onnx; it is deterministic (no random numbers).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .base import (
    ConvFactors,
    NumericalError,
    check_groups,
    check_int,
    check_kernel,
    check_matrix,
    check_rank,
    compose_chain,
    fmt_shape,
    leading_eigh,
    per_group,
    relative_error,
)
from .svd import (
    SVDFactors,
    TiledSVDFactors,
    channel_factors,
    check_channel_svd,
    check_spatial_svd,
    check_tiles,
    lowrank,
    spatial_factors,
    spatial_matrix,
    tiled_factors,
)
from .tucker import TuckerFactors, check_tucker_ranks, tucker_result, tucker_stages

__all__ = [
    "DEFAULT_MAX_ROWS",
    "shrinkage",
    "DataTuckerFactors",
    "Moments",
    "bias_shift",
    "conv_moments",
    "data_tucker2",
    "im2col",
    "iter_patches",
    "refit_chain",
    "refit_factors",
    "refit_last",
    "refit_matrix",
    "regression_target",
    "regularized",
    "relative_output_error",
    "same_pads",
    "target_and_sigma",
    "whitened_channel_svd",
    "whitened_spatial_svd",
    "whitened_svd",
    "whitened_tiled_svd",
]

# Rows (patches) per chunk that iter_patches yields by default: 65536 rows of a 3x3 conv with
# 256 input channels are 600 MB in float32; callers with wide layers pass a smaller bound.
DEFAULT_MAX_ROWS = 16384

# Cholesky retries: when a covariance is not numerically positive definite even after the
# relative regularisation, eps is multiplied by this factor, at most this many times.
_CHOL_GROWTH = 100.0
_CHOL_RETRIES = 2


# ----------------------------------------------------------------------------- im2col


def same_pads(
    input_spatial: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    mode: str = "SAME_UPPER",
) -> tuple[int, ...]:
    """Explicit pads ``(b1..bN, e1..eN)`` for an ONNX ``auto_pad`` mode.

    ONNX rule, per spatial dim with input size ``d``, kernel ``k``, stride ``s``, dilation
    ``δ``: ``out = ceil(d / s)`` and ``total = max((out - 1) s + (k - 1) δ + 1 - d, 0)``;
    ``SAME_UPPER`` puts ``floor(total / 2)`` at the beginning and the odd pixel at the end,
    ``SAME_LOWER`` the odd pixel at the beginning. ``VALID`` (and ``NOTSET``) give zeros.

    Args:
        input_spatial: the input's spatial sizes ``d1..dN``.
        kernel_shape: ``k1..kN``.
        strides: ``s1..sN`` (default ones).
        dilations: ``δ1..δN`` (default ones).
        mode: ``"SAME_UPPER"``, ``"SAME_LOWER"``, ``"VALID"`` or ``"NOTSET"``.

    Raises:
        ValueError: an unknown mode or inconsistent lengths.
    """
    method = "same_pads"
    kernel = _int_tuple(method, "kernel_shape", kernel_shape, None, minimum=1)
    n = len(kernel)
    spatial = _int_tuple(method, "input_spatial", input_spatial, n, minimum=1)
    strides = _int_tuple(method, "strides", strides, n, minimum=1)
    dilations = _int_tuple(method, "dilations", dilations, n, minimum=1)
    if mode in ("VALID", "NOTSET"):
        return (0,) * (2 * n)
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"{method}: auto_pad must be SAME_UPPER, SAME_LOWER, VALID or NOTSET, found {mode!r}")
    begins, ends = [], []
    for d, k, s, dil in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-d // s)
        total = max((out - 1) * s + (k - 1) * dil + 1 - d, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return (*begins, *ends)


def iter_patches(
    x: np.ndarray,
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    groups: int = 1,
    max_rows: int | None = DEFAULT_MAX_ROWS,
) -> Iterator[np.ndarray]:
    """The im2col patches of a Conv input, in chunks ``[groups, n_chunk, D]`` of at most ``max_rows`` rows.

    ``x [B, S, d1..dN]`` (N = 1, 2, 3) is zero-padded by ``pads = (b1..bN, e1..eN)``; the patch
    of group i at batch item b and output position ``o`` is

        ``p[(s, κ)] = xpad[b, i*S/g + s, o1 s1 + κ1 δ1, ..., oN sN + κN δN]``

    flattened channel-major (s, then κ1..κN, the last fastest), ``D = (S/g)*prod(k)``, so that
    ``y[b, i*T/g + t, o] = (W_i p)[t]`` with ``W_i = W[i*T/g:(i+1)*T/g].reshape(T/g, D)``. Rows
    are ordered batch-major, then the output positions in C order; concatenating the chunks
    along axis 1 gives :func:`im2col`. The output sizes are
    ``out_n = floor((d_n + b_n + e_n - (k_n - 1) δ_n - 1) / s_n) + 1``. Each chunk is a fresh
    contiguous array of x's dtype built from a strided view (no full im2col matrix is ever held).

    Args:
        x: float array ``[B, S, d1..dN]``.
        kernel_shape: ``k1..kN``.
        strides: default ones.
        dilations: default ones.
        pads: ``(b1..bN, e1..eN)``, default zeros (see :func:`same_pads` for auto_pad).
        groups: the Conv's ``group`` attribute, dividing S.
        max_rows: the most rows per chunk (>= 1); None: all rows in one chunk.

    Raises:
        ValueError: bad shapes or attributes, or an empty output.
    """
    view, groups, dim = _patch_view("iter_patches", x, kernel_shape, strides, dilations, pads, groups)
    if max_rows is None:
        max_rows = math.prod(view.shape[: (view.ndim - 2) // 2 + 1])
    max_rows = check_int("iter_patches", "max_rows", max_rows)
    return _chunks(view, groups, dim, max_rows)


def im2col(
    x: np.ndarray,
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    groups: int = 1,
) -> np.ndarray:
    """All im2col patches of a Conv input at once, ``[groups, B*prod(out), D]`` (see :func:`iter_patches`).

    For group i, ``np.einsum("td,nd->nt", W_i, im2col(...)[i])`` is the Conv output of group i's
    channels, rows ordered batch-major then output positions. Prefer :func:`iter_patches` (or
    :func:`conv_moments`) on large inputs: this holds the whole matrix.
    """
    view, groups, dim = _patch_view("im2col", x, kernel_shape, strides, dilations, pads, groups)
    rows = math.prod(view.shape[: (view.ndim - 2) // 2 + 1])  # B * prod(out)
    return next(_chunks(view, groups, dim, max(rows, 1)))


def _patch_view(
    method: str,
    x: object,
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None,
    dilations: Sequence[int] | None,
    pads: Sequence[int] | None,
    groups: object,
) -> tuple[np.ndarray, int, int]:
    """A strided view ``[B, out1..outN, S, k1..kN]`` of the padded input, the groups and D."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{method}: expected the input as a numpy array, found {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{method}: expected a floating-point input, found dtype {x.dtype}")
    kernel = _int_tuple(method, "kernel_shape", kernel_shape, None, minimum=1)
    n = len(kernel)
    if n not in (1, 2, 3) or x.ndim != n + 2:
        raise ValueError(
            f"{method}: expected an input [B, S, d1..dN] with N = {n} spatial dims matching "
            f"kernel_shape {list(kernel)} (N = 1, 2 or 3), found shape {fmt_shape(x.shape)}"
        )
    strides = _int_tuple(method, "strides", strides, n, minimum=1)
    dilations = _int_tuple(method, "dilations", dilations, n, minimum=1)
    pads = _int_tuple(method, "pads", pads, 2 * n, minimum=0)
    groups = check_int(method, "groups", groups)
    channels = x.shape[1]
    if channels % groups:
        raise ValueError(f"{method}: {channels} input channels are not divisible by groups={groups}")
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    padded_sizes = [size + b + e for size, b, e in zip(x.shape[2:], pads[:n], pads[n:], strict=True)]
    if any(p < s for p, s in zip(padded_sizes, spans, strict=True)) or x.shape[0] == 0 or channels == 0:
        raise ValueError(
            f"{method}: no output: input {fmt_shape(x.shape)} padded by {list(pads)} is smaller than "
            f"the dilated kernel {spans}"
        )
    padded = x
    if any(pads):
        padded = np.pad(x, [(0, 0), (0, 0), *zip(pads[:n], pads[n:], strict=True)])
    windows = sliding_window_view(padded, spans, axis=tuple(range(2, 2 + n)))  # [B, S, W.., span..]
    steps = (*(slice(None, None, s) for s in strides), *(slice(None, None, d) for d in dilations))
    index = (slice(None), slice(None), *steps)
    view = np.moveaxis(windows[index], 1, 1 + n)  # [B, out.., S, k..]
    return view, groups, (channels // groups) * math.prod(kernel)


def _chunks(view: np.ndarray, groups: int, dim: int, max_rows: int) -> Iterator[np.ndarray]:
    """Cut the row space ``(B, out1..outN)`` of ``view`` into C-order slabs of at most max_rows rows."""
    n = (view.ndim - 2) // 2
    row_dims = view.shape[: n + 1]
    # Level: the outermost row axis whose inner rows fit in a chunk; slabs slice it, outer axes index.
    inner = [math.prod(row_dims[level + 1 :]) for level in range(n + 1)]
    level = next(level for level in range(n + 1) if inner[level] <= max_rows)
    step = max_rows // inner[level]
    for outer in np.ndindex(*row_dims[:level]):
        for start in range(0, row_dims[level], step):
            slab = view[(*outer, slice(start, min(start + step, row_dims[level])))]
            rows = slab.reshape(-1, groups, dim)  # copies the strided windows
            yield np.ascontiguousarray(rows.transpose(1, 0, 2))


def _int_tuple(method: str, name: str, values: object, length: int | None, minimum: int) -> tuple[int, ...]:
    """Validate a sequence of integers (None: ``length`` defaults, 1 or 0 by ``minimum``)."""
    if values is None:
        if length is None:
            raise ValueError(f"{method}: {name} is required")
        return (minimum,) * length if minimum == 1 else (0,) * length
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ValueError(f"{method}: {name} must be a sequence of integers, found {values!r}")
    out = tuple(check_int(method, name, v, minimum=minimum) for v in values)
    if length is not None and len(out) != length:
        raise ValueError(f"{method}: expected {length} values in {name}, found {list(out)}")
    return out


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

    def merge(self, other: Moments) -> None:
        """Add another accumulator's sums to this one (parallel or batched accumulation)."""
        if other.n == 0:
            return
        if self.xx is None:
            self.n, self.sum_x, self.xx = other.n, other.sum_x.copy(), other.xx.copy()
            if other.tt is not None:
                self.sum_t, self.tt, self.xt = other.sum_t.copy(), other.tt.copy(), other.xt.copy()
            return
        if other.xx.shape != self.xx.shape:
            raise ValueError(
                f"Moments.merge: {other.groups} groups x {other.dim} values do not match {self.groups} x {self.dim}"
            )
        if other.tt is not None and self.tt is None:
            self.sum_t, self.tt, self.xt = self.sum_x.copy(), self.xx.copy(), self.xx.copy()
        if self.tt is not None:
            self.sum_t += other.sum_t if other.tt is not None else other.sum_x
            self.tt += other.tt if other.tt is not None else other.xx
            self.xt += other.xt if other.tt is not None else other.xx
        self.sum_x += other.sum_x
        self.xx += other.xx
        self.n += other.n

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
    mean_x: np.ndarray
    mean_t: np.ndarray
    xx: np.ndarray
    tt: np.ndarray
    xt: np.ndarray
    paired: bool


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


# ----------------------------------------------------------------------------- whitening


def regularized(sigma: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """``sigma + eps * (trace(sigma) / D) * I``: a ridge relative to the mean variance.

    Makes a PSD (possibly rank-deficient) second-moment matrix ``[D, D]`` (or a stack
    ``[..., D, D]``) positive definite while touching well-excited directions by a relative
    ``eps`` only; when the trace is 0 the ridge is ``eps * I``. Returns a new float64 array.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    dim = sigma.shape[-1]
    scale = np.trace(sigma, axis1=-2, axis2=-1) / dim
    scale = np.where(scale > 0, scale, 1.0) * eps
    out = sigma.copy()
    index = np.arange(dim)
    out[..., index, index] += np.asarray(scale)[..., None]
    return out


def shrinkage(moments: Moments) -> float:
    """Regularisation of the input second moment `Σ + ε·(tr Σ / D)·I`, `ε = 1e-6 + D / n`.

    With n input vectors of dimension D, Σ estimated from fewer vectors than dimensions is
    rank-deficient and a whitened fit would ignore every direction the calibration set missed;
    shrinking towards the identity (weight-only fitting) in proportion to D/n keeps a small
    calibration set from doing worse than no calibration at all (Ledoit–Wolf-style shrinkage).
    """
    return 1e-6 + moments.dim / max(moments.n, 1)


def _cholesky(method: str, sigma: np.ndarray, eps: float) -> np.ndarray:
    """Lower Cholesky factor of ``regularized(sigma, eps)``.

    When rounding leaves the matrix not positive definite, eps grows by ``_CHOL_GROWTH`` (from
    at least 1e-10) at most ``_CHOL_RETRIES`` times; a matrix with a negative diagonal entry is
    not a second-moment matrix and is refused at once.
    """
    if np.any(np.diagonal(sigma, axis1=-2, axis2=-1) < 0):
        raise ValueError(f"{method}: the second-moment matrix is not positive semi-definite (negative diagonal)")
    floor = max(eps, 1e-10)
    for attempt in range(_CHOL_RETRIES + 1):
        try:
            return np.linalg.cholesky(regularized(sigma, eps if attempt == 0 else floor * _CHOL_GROWTH**attempt))
        except np.linalg.LinAlgError:
            continue
    raise NumericalError(f"{method}: the second-moment matrix is not numerically positive definite "
                         f"even with a ridge of {floor * _CHOL_GROWTH**_CHOL_RETRIES:.1g} (Cholesky failed)")


def _solve_spd(method: str, matrix: np.ndarray, rhs_rows: np.ndarray) -> np.ndarray:
    """``rhs_rows @ matrix^-1`` for a symmetric positive definite ``matrix`` (solves with its Cholesky factor)."""
    factor = _cholesky(method, matrix, 0.0)
    half = np.linalg.solve(factor, rhs_rows.T)  # L^-1 R^T
    return np.linalg.solve(factor.T, half).T  # (L^-T L^-1 R^T)^T = R M^-1


def whitened_svd(
    W: np.ndarray,
    sigma: np.ndarray,
    rank: int,
    target: np.ndarray | None = None,
    *,
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-r ``A B`` minimising the output error ``E||M p - A B p||^2`` for patches with ``E[p p^T] = sigma``.

    ``M = target`` when given, else ``W`` (``[m, D]``). With ``L = chol(regularized(sigma, eps))``
    (lower, ``L L^T = sigma + ridge``), ``E||(M - A B) p||^2 = ||(M - A B) L||_F^2``, so by
    Eckart-Young the optimum is the truncated SVD ``M L ~ U_r S_r V_r^T``:

        ``A = U_r S_r^(1/2)``  ``[m, r]``,   ``B = S_r^(1/2) V_r^T L^-1``  ``[r, D]``

    (``B`` by a triangular-factor solve, never an explicit inverse). The squared output error is
    ``sum_{i > r} s_i^2`` of the returned ``singular_values`` (all ``min(m, D)`` singular values of
    ``M L``, descending), so ``sum(s[r:]^2) / sum(s^2)`` is the relative output error energy. At
    full rank ``A B = M`` to rounding. Signs are deterministic: each column of A has its
    largest-magnitude entry positive. In sequential mode pass ``target = regression_target(...)``
    and ``sigma = cov_tt`` (reduced-rank regression of the original output on ``p~``).

    Raises:
        ValueError: bad shapes, a rank out of ``1..min(m, D)`` or a non-PSD sigma.
    """
    method = "whitened_svd"
    matrix = check_matrix(method, W)
    if target is not None:
        target = check_matrix(method, target)
        if target.shape != matrix.shape:
            raise ValueError(f"{method}: target {fmt_shape(target.shape)} does not match W {fmt_shape(matrix.shape)}")
        matrix = target
    sigma64 = _square(method, "sigma", sigma, matrix.shape[1])
    rank = check_rank(method, rank, min(matrix.shape), matrix.shape, what="matrix")
    factor = _cholesky(method, sigma64, eps)
    left, right, values = lowrank(matrix @ factor, rank)
    second = np.linalg.solve(factor.T, right.T).T  # S^(1/2) V^T L^-1
    return left, second, values


def regression_target(W: np.ndarray, cov_xt: np.ndarray, cov_tt: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    """``W* = (W Sxt + λW)(Stt + λI)^-1``: the linear map of ``p~`` closest to the original output.

    λ is `regularized`'s shrinkage; the ridge pulls W* towards W (not towards 0), so directions
    the calibration set does not cover keep the original weights.

    ``W*`` minimises ``E||W p - W* p~||^2`` (normal equations ``W* Stt = W Sxt``), so for any
    ``W'``: ``E||W p - W' p~||^2 = E||W p - W* p~||^2 + E||(W* - W') p~||^2``, and the whitened
    SVD of ``W*`` under ``Stt`` is the reduced-rank regression of the original output on the
    compressed model's input (both factors refitted). Equals W when ``p~ = p``.
    """
    method = "regression_target"
    W64 = check_matrix(method, W)
    cov_xt = _square(method, "cov_xt", cov_xt, W64.shape[1])
    cov_tt = _square(method, "cov_tt", cov_tt, W64.shape[1])
    shrunk = regularized(cov_tt, eps)
    # Ridge towards W itself: (W Sxt + λ W)(Stt + λ I)^-1, so a small calibration set moves W little.
    return _solve_spd(method, shrunk, W64 @ cov_xt + W64 @ (shrunk - cov_tt))


def target_and_sigma(
    W_rows: np.ndarray, moments: Moments, group: int = 0, *, eps: float = 1e-6
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(Stt, target)`` of one group for :func:`whitened_svd`: ``whitened_svd(W, *target_and_sigma(W, m, i), r)``.

    ``Stt = E[p~ p~^T]`` of group ``group`` (``E[p p^T]`` when unpaired) and the map to fit:
    None (fit W itself) when the moments are unpaired, else the regression target
    ``W Sxt Stt^-1`` (:func:`regression_target`). ``W_rows [m, D]`` is the lowered weight of
    that group (a matrix ``x @ W`` passes ``W^T``).
    """
    method = "target_and_sigma"
    W64 = check_matrix(method, W_rows)
    if not isinstance(moments, Moments):
        raise ValueError(f"{method}: expected a Moments accumulator, found {type(moments).__name__}")
    group = check_int(method, "group", group, minimum=0)
    if group >= moments.groups:
        raise ValueError(f"{method}: group {group} out of range for moments of {moments.groups} groups")
    moments = _check_moments(method, moments, moments.groups, W64.shape[1])
    stats = moments.group(group)
    return stats.tt, (_target(stats, W64, eps) if stats.paired else None)


def _square(method: str, name: str, matrix: object, dim: int) -> np.ndarray:
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape != (dim, dim):
        raise ValueError(f"{method}: expected {name} of shape [{dim}, {dim}], found {fmt_shape(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{method}: {name} holds NaN or Inf values")
    return array


def _check_moments(method: str, moments: object, groups: int, dim: int) -> Moments:
    if not isinstance(moments, Moments):
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


def _target(stats: _GroupStats, block: np.ndarray, eps: float) -> np.ndarray:
    """The map to fit: W itself (p~ = p) or the regression target (:func:`regression_target`)."""
    if not stats.paired:
        return block
    return regression_target(block, stats.xt, stats.tt, eps=eps)


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
        return whitened_svd(lowered, stats.tt, rank, _target(stats, lowered, eps), eps=eps)

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
        target = _target(stats, block.reshape(block.shape[0], -1), eps).reshape(block.shape)
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
        return whitened_svd(tile, stats.tt[columns, columns], rank, eps=eps)

    lowered = _target(stats, kernel64.reshape(out_channels, -1), eps)
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
        target = _target(stats, block, eps)
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
        core = _solve_spd(method, shrunk, numerator + project(block) @ (shrunk - gram))
        stages = tucker_stages(
            None if rank_in is None else in_basis,
            core.reshape(core.shape[0], rank_in or in_g, *spatial),
            None if rank_out is None else out_basis,
        )
        return stages, (np.sqrt(out_values), np.sqrt(in_values))

    results = per_group(kernel64, groups, factor_one, _group_stats(moments, groups))
    return tucker_result(DataTuckerFactors, kernel64, groups, (rank_out, rank_in), results, n_iter=0)


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
    cov_xt = _square(method, "cov_xt", cov_xt, dim)
    cov_tt = _square(method, "cov_tt", cov_tt, dim)
    if not isinstance(ridge, numbers.Real) or not ridge >= 0:
        raise ValueError(f"{method}: ridge must be a number >= 0, found {ridge!r}")
    gram = H64 @ cov_tt @ H64.T
    size = gram.shape[0]
    lam = float(ridge) * float(np.trace(gram)) / size
    if lam <= 0:
        lam = float(ridge) if ridge > 0 else 0.0
    gram = gram + lam * np.eye(size)
    rhs = W64 @ cov_xt @ H64.T
    if prior is not None:  # ridge towards the factor as factorized, not towards 0
        rhs = rhs + lam * np.asarray(prior, dtype=np.float64).reshape(rhs.shape)
    return _solve_spd(method, gram, rhs)


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
        A = refit_last(W_rows, H, stats.xt, stats.tt, ridge, prior=current) if refit else current
        new_last[rows] = A.reshape(out_block, mid_per_block, *last_kernel)
        if with_bias:
            delta[rows] = bias_shift(W_rows, A, H, stats.mean_x, stats.mean_t)
    if not refit:
        new_last = last.copy()
    return new_last.astype(last.dtype), delta.astype(last.dtype)


def refit_factors(
    factors: ConvFactors,
    kernel: np.ndarray,
    moments: Moments,
    ridge: float = 1e-3,
    *,
    with_bias: bool = True,
    refit: bool = True,
) -> tuple[ConvFactors, np.ndarray]:
    """:func:`refit_chain` on a conv factorization result: the same result with the last stage refitted.

    Returns ``(refitted, bias_delta)``: a result of the same type whose last stage is replaced
    (``rel_error`` re-measured against ``kernel``; other fields, e.g. spectra, kept from the
    input) and the ``[T]`` bias delta (float64; zeros when ``with_bias`` is False);
    ``with_bias`` and ``refit`` as in :func:`refit_chain`.
    """
    if not isinstance(factors, ConvFactors):
        raise ValueError(f"refit_factors: expected a conv factorization result, found {type(factors).__name__}")
    stages = factors.stages
    new_last, delta = refit_chain(
        stages,
        factors.groups_per_stage,
        factors.groups_per_stage[-1],
        factors.groups,
        moments,
        kernel,
        factors._input_orders(),
        ridge,
        with_bias=with_bias,
        refit=refit,
    )
    draft = replace(factors, stages=(*stages[:-1], new_last), rel_error=math.nan)
    kernel64 = check_kernel("refit_factors", kernel)
    return replace(draft, rel_error=relative_error(kernel64, draft.to_tensor())), delta


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
        A = refit_last(W64.T, P64.T, stats.xt, stats.tt, ridge, prior=None if Q is None else np.asarray(Q).T)
    else:
        if Q is None:
            raise ValueError(f"{method}: refit=False needs the current second factor Q")
        A = check_matrix(method, Q).T
        if A.shape != (W64.shape[1], P64.shape[1]):
            raise ValueError(f"{method}: Q {fmt_shape(A.T.shape)} does not match P {fmt_shape(P64.shape)} and W")
    delta = bias_shift(W64.T, A, P64.T, stats.mean_x, stats.mean_t) if with_bias else np.zeros(W64.shape[1])
    return A.T, delta


def relative_output_error(
    kernel: np.ndarray,
    approx: np.ndarray,
    groups: int,
    moments: Moments,
    bias_delta: np.ndarray | None = None,
) -> float:
    """``sqrt(E||W p - W' p~ - c||^2 / E||W p||^2)`` summed over groups, from the moments.

    ``kernel`` and ``approx`` are ``[T, ...]`` (conv kernels ``[T, S/g, k..]`` or lowered
    ``[T, D]``; a matrix ``x @ W`` passes ``W^T``), ``c = bias_delta`` ``[T]`` an optional
    constant added to the approximation's output (e.g. from :func:`refit_chain`). The
    Frobenius-norm-like ratio, comparable with ``Factors.rel_error``; its square is the
    output-error energy ratio. Per group:
    ``E||e||^2 = tr(W Sxx W^T) - 2 tr(W Sxt W'^T) + tr(W' Stt W'^T) - 2 c^T (W mx - W' mt) + ||c||^2``
    (computed as ``tr(E Sxx E^T)``, ``E = W - W'``, when unpaired).
    """
    method = "relative_output_error"
    W64 = np.asarray(kernel, dtype=np.float64)
    A64 = np.asarray(approx, dtype=np.float64)
    if W64.shape != A64.shape:
        raise ValueError(f"{method}: approx {fmt_shape(A64.shape)} does not match kernel {fmt_shape(W64.shape)}")
    groups = check_groups(method, groups, W64.shape)
    out_g = W64.shape[0] // groups
    W64 = W64.reshape(groups, out_g, -1)
    A64 = A64.reshape(groups, out_g, -1)
    moments = _check_moments(method, moments, groups, W64.shape[2])
    c = np.zeros((groups, out_g)) if bias_delta is None else np.asarray(bias_delta, np.float64).reshape(groups, out_g)
    error = total = 0.0
    for index in range(groups):
        stats = moments.group(index)
        w, a = W64[index], A64[index]
        total += float(np.einsum("ij,jk,ik->", w, stats.xx, w))
        if stats.paired:
            err = (
                np.einsum("ij,jk,ik->", w, stats.xx, w)
                - 2.0 * np.einsum("ij,jk,ik->", w, stats.xt, a)
                + np.einsum("ij,jk,ik->", a, stats.tt, a)
            )
            mean_diff = w @ stats.mean_x - a @ stats.mean_t
        else:
            diff = w - a
            err = np.einsum("ij,jk,ik->", diff, stats.xx, diff)
            mean_diff = diff @ stats.mean_x
        error += float(err) - 2.0 * float(c[index] @ mean_diff) + float(c[index] @ c[index])
    if total <= 0:
        return 0.0 if error <= 0 else math.inf
    return math.sqrt(max(error, 0.0) / total)
