"""SVD-based factorizations: truncated SVD of a matrix, channel, spatial and tiled SVD of a conv.

All of them rest on :func:`lowrank`, the rank-r truncated SVD ``M ~ P Q`` with
``P = U_r S_r^(1/2)`` and ``Q = S_r^(1/2) V_r^T`` (the singular values split evenly between
the factors, which keeps both well scaled in fp16). It is computed from the eigenvectors of
the smaller Gram matrix (``M M^T`` or ``M^T M``), much faster than a full SVD of a wide
matrix; the product ``P Q`` is the orthogonal projection of M on the leading subspace, so the
reconstruction is accurate even where the small singular values are not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from .base import (
    ConvFactors,
    Factors,
    build,
    canonical_signs,
    check_groups,
    check_int,
    check_kernel,
    check_matrix,
    check_rank,
    leading_eigh,
    per_group,
    stack_groups,
)

__all__ = [
    "MatrixFactors",
    "SVDFactors",
    "TiledSVDFactors",
    "channel_factors",
    "channel_svd",
    "check_channel_svd",
    "check_spatial_svd",
    "check_tiles",
    "lowrank",
    "spatial_factors",
    "spatial_matrix",
    "spatial_svd",
    "tiled_factors",
    "tiled_svd",
    "truncated_svd",
]

# A factorizer of one lowered matrix: ``(left [m, r], right [r, n], all singular values)``.
LowRank = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True, eq=False)
class MatrixFactors(Factors):
    """A matrix ``M [K, N] ~ left @ right``; ``stages = (left, right)``.

    Attributes:
        singular_values: all ``min(K, N)`` singular values of M, descending.
    """

    singular_values: np.ndarray

    @property
    def left(self) -> np.ndarray:
        """``U_r S_r^(1/2)``, shape ``[K, r]`` (float64)."""
        return self.stages[0]

    @property
    def right(self) -> np.ndarray:
        """``S_r^(1/2) V_r^T``, shape ``[r, N]`` (float64)."""
        return self.stages[1]

    def to_tensor(self) -> np.ndarray:
        """``left @ right`` (float64)."""
        return self.left @ self.right


@dataclass(frozen=True, eq=False)
class SVDFactors(ConvFactors):
    """Channel or spatial SVD of a conv kernel: two Conv stages.

    Attributes:
        singular_values: per group, all singular values of the factored matrix, descending.
    """

    singular_values: tuple[np.ndarray, ...]


@dataclass(frozen=True, eq=False)
class TiledSVDFactors(ConvFactors):
    """Tiled SVD of a conv kernel: grouped Conv, channel shuffle, grouped 1x1 Conv.

    Attributes:
        tiles: ``(a, b)``: a row tiles split the T output channels, b column tiles the S inputs.
        singular_values: ``singular_values[i][j]``: all singular values of tile (i, j), descending.
    """

    tiles: tuple[int, int]
    singular_values: tuple[tuple[np.ndarray, ...], ...]

    @property
    def needs_shuffle(self) -> bool:
        """Whether the rewrite must shuffle channels between the stages (a > 1 and b > 1)."""
        return self.tiles[0] > 1 and self.tiles[1] > 1

    @property
    def shuffle_order(self) -> np.ndarray | None:
        """Stage-2 input channel c reads stage-1 output channel ``shuffle_order[c]`` (None: identity).

        The same permutation as Reshape ``[B, b, a, r, -1]`` -> Transpose ``[0, 2, 1, 3, 4]``.
        """
        if not self.needs_shuffle:
            return None
        rows, cols = self.tiles
        rank = self.ranks[0]
        return np.arange(cols * rows * rank).reshape(cols, rows, rank).transpose(1, 0, 2).reshape(-1)

    def _input_orders(self) -> tuple[np.ndarray | None, ...]:
        return (None, self.shuffle_order)


def lowrank(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-``rank`` truncated SVD ``M ~ P Q`` of a float64 matrix ``M [K, N]`` (unvalidated).

    Returns ``P = U_r S_r^(1/2)`` ``[K, r]``, ``Q = S_r^(1/2) V_r^T`` ``[r, N]`` and all
    ``min(K, N)`` singular values (descending). Each column of P is signed so that its
    largest-magnitude entry is positive.
    """
    if matrix.shape[0] <= matrix.shape[1]:
        values, basis = leading_eigh(matrix @ matrix.T, rank)
        scaled = basis.T @ matrix  # S_r V_r^T
        root = np.sqrt(np.linalg.norm(scaled, axis=1))
        left = basis * root
        right = scaled / np.where(root > 0, root, 1.0)[:, None]
    else:
        values, basis = leading_eigh(matrix.T @ matrix, rank)
        scaled = matrix @ basis  # U_r S_r
        root = np.sqrt(np.linalg.norm(scaled, axis=0))
        left = scaled / np.where(root > 0, root, 1.0)
        right = (basis * root).T
    signs = canonical_signs(left)
    return left * signs, right * signs[:, None], np.sqrt(values)


def truncated_svd(matrix: np.ndarray, rank: int) -> MatrixFactors:
    """Truncated SVD of a weight matrix (Gemm, MatMul): ``M [K, N] ~ left [K, r] @ right [r, N]``.

    ``left = U_r S_r^(1/2)``, ``right = S_r^(1/2) V_r^T``; by Eckart-Young the error is optimal,
    ``||M - left @ right||_F^2 = sum_{i > r} s_i^2``. ``weights = (left, right)`` in float32:
    ``MatMul(X, W)`` becomes ``MatMul(MatMul(X, left), right)``.

    Args:
        matrix: float array ``[K, N]``.
        rank: ``1 <= r <= min(K, N)``.

    Raises:
        ValueError: not a finite float matrix, or a rank out of range.
    """
    method = "truncated_svd"
    matrix64 = check_matrix(method, matrix)
    rank = check_rank(method, rank, min(matrix64.shape), matrix64.shape, what="matrix")
    left, right, singular_values = lowrank(matrix64, rank)
    return build(
        MatrixFactors,
        matrix64,
        method="svd",
        shape=tuple(matrix64.shape),
        ranks=(rank,),
        stages=(left, right),
        groups_per_stage=(1, 1),
        singular_values=singular_values,
    )


def channel_svd(kernel: np.ndarray, rank: int, groups: int = 1) -> SVDFactors:
    """Channel (lowered-matrix) SVD of a conv kernel, per group.

    Each group's kernel ``W_g [T/g, S/g, k..]`` is viewed as the matrix ``[T/g, (S/g)*prod(k)]``
    and factored ``W_g ~ A B`` at rank r (see :func:`truncated_svd`). Stages:
    ``[g*r, S/g, k..]`` (B, group g, the original strides, dilations and pads), then
    ``[T, r, 1..]`` (A, 1x1, group g). Full rank ``min(T/g, (S/g)*prod(k))`` is exact.
    The im2col view of Jaderberg et al. 2014 / Denton et al. 2014.

    Args:
        kernel: float array ``[T, S/g, k1..kN]``, N = 1, 2 or 3.
        rank: per-group rank r.
        groups: the Conv's ``group`` attribute.

    Raises:
        ValueError: bad kernel, groups or rank.
    """
    kernel64, groups, rank = check_channel_svd("channel_svd", kernel, groups, rank)
    return channel_factors(kernel64, groups, rank, lambda lowered: lowrank(lowered, rank))


def spatial_svd(kernel: np.ndarray, rank: int, groups: int = 1) -> SVDFactors:
    """Spatial SVD of a 2-D conv kernel, per group: ``kh x kw`` -> ``kh x 1`` then ``1 x kw``.

    Jaderberg et al. 2014, scheme 2. Per group, ``M[(s, i), (t, j)] = W[t, s, i, j]`` of shape
    ``((S/g)*kh) x ((T/g)*kw)`` is factored ``M ~ P Q`` at rank r. Stages:
    ``[g*r, S/g, kh, 1]`` (``V1[r, s, i, 0] = P[(s, i), r]``, group g) then
    ``[T, r, 1, kw]`` (``V2[t, r, 0, j] = Q[r, (t, j)]``, group g).
    Full rank ``min((S/g)*kh, (T/g)*kw)`` is exact.

    Args:
        kernel: float array ``[T, S/g, kh, kw]``.
        rank: per-group rank r.
        groups: the Conv's ``group`` attribute.

    Raises:
        ValueError: not a 2-D conv kernel, bad groups or rank.
    """
    kernel64, groups, rank = check_spatial_svd("spatial_svd", kernel, groups, rank)
    return spatial_factors(kernel64, groups, rank, lambda block: lowrank(spatial_matrix(block), rank))


def tiled_svd(kernel: np.ndarray, tiles: tuple[int, int], rank: int, groups: int = 1) -> TiledSVDFactors:
    """Tiled SVD of a conv kernel (Lee et al., DeepTwist): the lowered matrix cut into a x b tiles.

    a row tiles split the T output channels, b column tiles split the S input channels (a
    column tile is a channel group). Tile ``(i, j) = W[i-th T block, j-th S block]``, viewed as
    ``[T/a, (S/b)*prod(k)]``, is factored ``A_ij B_ij`` at rank r, and
    ``y_i = sum_j A_ij (B_ij * x_j)``. Stages:

    1. ``[b*a*r, S/b, k..]``, group b: group j outputs ``B_0j .. B_(a-1)j`` stacked (i-major);
    2. when a > 1 and b > 1, a channel shuffle (Reshape ``[B, b, a, r, -1]``, Transpose
       ``[0, 2, 1, 3, 4]``, see ``shuffle_order``);
    3. ``[T, b*r, 1..]``, group a: group i's weight is ``[A_i0 | A_i1 | ...]`` side by side.

    Full rank per tile ``min(T/a, (S/b)*prod(k))`` is exact.

    Args:
        kernel: float array ``[T, S, k1..kN]``, N = 1, 2 or 3.
        tiles: ``(a, b)``, dividing T and S.
        rank: per-tile rank r.
        groups: must be 1 (the tiles define the stages' groups).

    Raises:
        ValueError: bad kernel, grouped kernel, non-dividing tiles or a rank out of range.
    """
    method = "tiled_svd"
    kernel64 = check_kernel(method, kernel)
    groups = check_int(method, "groups", groups)
    if groups != 1:
        raise ValueError(f"{method}: needs an ungrouped kernel (groups=1), found groups={groups}")
    tiles, rank = check_tiles(method, kernel64, tiles, rank)
    lowered = kernel64.reshape(kernel64.shape[0], -1)
    return tiled_factors(kernel64, lowered, tiles, rank, lambda tile, _: lowrank(tile, rank))


# ----------------------------------------------------------------------------- shared layouts
# The weight-only factorizations above and the data-aware ones (``data.py``) differ only in how
# one lowered matrix is factored; validation, the stage layout and the result are built here.


def check_channel_svd(method: str, kernel: object, groups: object, rank: object) -> tuple[np.ndarray, int, int]:
    """Validate a channel-SVD call: the kernel (float64), groups and the rank ``1..min(T/g, (S/g)*prod(k))``."""
    kernel64 = check_kernel(method, kernel)
    groups = check_groups(method, groups, kernel64.shape)
    out_channels, in_per_group, *spatial = kernel64.shape
    full = min(out_channels // groups, in_per_group * math.prod(spatial))
    return kernel64, groups, check_rank(method, rank, full, kernel64.shape, groups=groups)


def check_spatial_svd(method: str, kernel: object, groups: object, rank: object) -> tuple[np.ndarray, int, int]:
    """Validate a spatial-SVD call: a 2-D kernel (float64), groups and the rank ``1..min((S/g)*kh, (T/g)*kw)``."""
    kernel64 = check_kernel(method, kernel, spatial_dims=(2,))
    groups = check_groups(method, groups, kernel64.shape)
    out_channels, in_per_group, kh, kw = kernel64.shape
    full = min(in_per_group * kh, out_channels // groups * kw)
    return kernel64, groups, check_rank(method, rank, full, kernel64.shape, groups=groups)


def check_tiles(method: str, kernel64: np.ndarray, tiles: object, rank: object) -> tuple[tuple[int, int], int]:
    """Validate the tiles ``(a, b)`` of an ungrouped kernel and the per-tile rank; return both."""
    if not isinstance(tiles, tuple | list) or len(tiles) != 2:
        raise ValueError(f"{method}: tiles must be a pair (row tiles, column tiles), found {tiles!r}")
    rows = check_int(method, "row tiles", tiles[0])
    cols = check_int(method, "column tiles", tiles[1])
    out_channels, in_channels, *spatial = kernel64.shape
    if out_channels % rows:
        raise ValueError(f"{method}: {rows} row tiles do not divide {out_channels} output channels")
    if in_channels % cols:
        raise ValueError(f"{method}: {cols} column tiles do not divide {in_channels} input channels")
    full = min(out_channels // rows, in_channels // cols * math.prod(spatial))
    return (rows, cols), check_rank(method, rank, full, kernel64.shape, what=f"kernel's {rows}x{cols} tiles")


def _svd_result(method: str, kernel64: np.ndarray, rank: int, groups: int, results: list) -> SVDFactors:
    """The two-stage result from per-group ``(stages, singular values)``."""
    return build(
        SVDFactors,
        kernel64,
        method=method,
        shape=tuple(kernel64.shape),
        ranks=(rank,),
        stages=stack_groups([stages for stages, _ in results]),
        groups_per_stage=(groups, groups),
        groups=groups,
        singular_values=tuple(values for _, values in results),
    )


def channel_factors(
    kernel64: np.ndarray,
    groups: int,
    rank: int,
    factor_group: Callable[..., LowRank],
    *per_group_args: Iterable[object],
) -> SVDFactors:
    """The channel-SVD chain of a validated kernel from a factorizer of each lowered group weight.

    ``factor_group(W_g [T/g, (S/g)*prod(k)], *args) -> (A [T/g, r], B [r, (S/g)*prod(k)], values)``
    with ``W_g ~ A B`` (``args``: group g's item of each of ``per_group_args``). Stages
    ``[g*r, S/g, k..]`` (B, group g) then ``[T, r, 1..]`` (A, group g).
    """
    _, in_per_group, *spatial = kernel64.shape
    ones = [1] * len(spatial)

    def factor_one(block: np.ndarray, *args: object) -> tuple[list[np.ndarray], np.ndarray]:
        left, right, values = factor_group(block.reshape(block.shape[0], -1), *args)
        return [right.reshape(rank, in_per_group, *spatial), left.reshape(block.shape[0], rank, *ones)], values

    results = per_group(kernel64, groups, factor_one, *per_group_args)
    return _svd_result("svd", kernel64, rank, groups, results)


def spatial_matrix(block: np.ndarray) -> np.ndarray:
    """``M[(s, i), (t, j)] = W[t, s, i, j]`` of a group's kernel ``[T/g, S/g, kh, kw]``: ``((S/g)*kh) x ((T/g)*kw)``."""
    out_per_group, in_per_group, kh, kw = block.shape
    return block.transpose(1, 2, 0, 3).reshape(in_per_group * kh, out_per_group * kw)


def spatial_factors(
    kernel64: np.ndarray,
    groups: int,
    rank: int,
    factor_group: Callable[..., LowRank],
    *per_group_args: Iterable[object],
) -> SVDFactors:
    """The spatial-SVD chain of a validated 2-D kernel from a factorizer of each group's kernel.

    ``factor_group(W_g [T/g, S/g, kh, kw], *args) -> (P [(S/g)*kh, r], Q [r, (T/g)*kw], values)``
    with ``spatial_matrix(W_g) ~ P Q``. Stages ``[g*r, S/g, kh, 1]`` (``V1[r, s, i, 0] = P[(s, i), r]``)
    then ``[T, r, 1, kw]`` (``V2[t, r, 0, j] = Q[r, (t, j)]``), both group g.
    """
    out_channels, in_per_group, kh, kw = kernel64.shape
    out_per_group = out_channels // groups

    def factor_one(block: np.ndarray, *args: object) -> tuple[list[np.ndarray], np.ndarray]:
        left, right, values = factor_group(block, *args)
        first = left.T.reshape(rank, in_per_group, kh, 1)
        second = right.reshape(rank, out_per_group, kw).transpose(1, 0, 2)[:, :, None, :]
        return [first, second], values

    results = per_group(kernel64, groups, factor_one, *per_group_args)
    return _svd_result("spatial-svd", kernel64, rank, groups, results)


def tiled_factors(
    kernel64: np.ndarray,
    lowered: np.ndarray,
    tiles: tuple[int, int],
    rank: int,
    factor_tile: Callable[[np.ndarray, int], LowRank],
) -> TiledSVDFactors:
    """The tiled-SVD chain of a validated kernel ``[T, S, k..]`` from a factorizer of each tile.

    ``lowered [T, S*prod(k)]`` is the matrix whose tiles are factored (the kernel lowered, or a
    data-aware target of it); ``factor_tile(tile [T/a, (S/b)*prod(k)], j) -> (A_ij, B_ij, values)``
    for the tile in column block j. Stage layout, groups and shuffle as in :func:`tiled_svd`.
    """
    rows, cols = tiles
    out_channels, in_channels, *spatial = kernel64.shape
    tile_out, tile_in = out_channels // rows, in_channels // cols
    width = lowered.shape[1] // cols
    first = np.empty((cols, rows, rank, tile_in, *spatial))
    second = np.empty((rows, tile_out, cols, rank))
    values = [[np.empty(0)] * cols for _ in range(rows)]
    for i in range(rows):
        for j in range(cols):
            tile = lowered[i * tile_out : (i + 1) * tile_out, j * width : (j + 1) * width]
            left, right, values[i][j] = factor_tile(tile, j)
            first[j, i] = right.reshape(rank, tile_in, *spatial)
            second[i, :, j] = left
    ones = [1] * len(spatial)
    return build(
        TiledSVDFactors,
        kernel64,
        method="tiled-svd",
        shape=tuple(kernel64.shape),
        ranks=(rank,),
        stages=(
            first.reshape(cols * rows * rank, tile_in, *spatial),
            second.reshape(out_channels, cols * rank, *ones),
        ),
        groups_per_stage=(cols, rows),
        groups=1,
        tiles=(rows, cols),
        singular_values=tuple(tuple(row) for row in values),
    )
