"""im2col: the patches a Conv multiplies by its lowered weight, streamed in bounded chunks.

The patch of group i at batch item b and output position ``o`` is the vector of group i's input
channels under the kernel footprint, flattened channel-major ``(s, k1..kN)``, of length
``D = (S/g)*prod(k)``; with the lowered group weight ``W_i [T/g, D]`` the Conv output there is
``y = W_i p`` (before the bias). This module never imports onnx.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .base import check_int, fmt_shape

__all__ = ["DEFAULT_MAX_ROWS", "im2col", "iter_patches", "same_pads"]

# Rows (patches) per chunk that iter_patches yields by default: 65536 rows of a 3x3 conv with
# 256 input channels are 600 MB in float32; callers with wide layers pass a smaller bound.
DEFAULT_MAX_ROWS = 16384


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
    choose: Callable[[int], np.ndarray] | None = None,
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
        choose: given a chunk's row count, a boolean mask of the rows to keep: only those
            patches are formed (a random subset of a high-resolution input costs its own size,
            not the input's).

    Raises:
        ValueError: bad shapes or attributes, or an empty output.
    """
    view, groups, dim = _patch_view("iter_patches", x, kernel_shape, strides, dilations, pads, groups)
    if max_rows is None:
        max_rows = math.prod(view.shape[: (view.ndim - 2) // 2 + 1])
    max_rows = check_int("iter_patches", "max_rows", max_rows)
    return _chunks(view, groups, dim, max_rows, choose)


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


def _chunks(view: np.ndarray, groups: int, dim: int, max_rows: int,
            choose: Callable[[int], np.ndarray] | None = None) -> Iterator[np.ndarray]:
    """Cut the row space ``(B, out1..outN)`` of ``view`` into C-order slabs of at most max_rows rows
    (of them, the rows `choose` keeps)."""
    n = (view.ndim - 2) // 2
    row_dims = view.shape[: n + 1]
    # Level: the outermost row axis whose inner rows fit in a chunk; slabs slice it, outer axes index.
    inner = [math.prod(row_dims[level + 1 :]) for level in range(n + 1)]
    level = next(level for level in range(n + 1) if inner[level] <= max_rows)
    step = max_rows // inner[level]
    for outer in np.ndindex(*row_dims[:level]):
        for start in range(0, row_dims[level], step):
            slab = view[(*outer, slice(start, min(start + step, row_dims[level])))]
            if choose is not None:  # gathers only the chosen windows, in the same C order
                kept = np.flatnonzero(choose(math.prod(slab.shape[: n + 1 - level])))
                slab = slab[np.unravel_index(kept, slab.shape[: n + 1 - level])]
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


