"""SVD-based factorizations: truncated SVD of a matrix, channel, spatial and tiled SVD of a conv.

All of them rest on :func:`lowrank`, the rank-r truncated SVD ``M ~ P Q`` with
``P = U_r S_r^(1/2)`` and ``Q = S_r^(1/2) V_r^T`` (the singular values split evenly between
the factors, which keeps both well scaled in fp16). It is computed from the eigenvectors of
the smaller Gram matrix (``M M^T`` or ``M^T M``), much faster than a full SVD of a wide
matrix; the product ``P Q`` is the orthogonal projection of M on the leading subspace, so the
reconstruction is accurate even where the small singular values are not.
"""

from __future__ import annotations

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
    "channel_svd",
    "lowrank",
    "spatial_svd",
    "tiled_svd",
    "truncated_svd",
]


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
    method = "channel_svd"
    kernel64 = check_kernel(method, kernel)
    groups = check_groups(method, groups, kernel64.shape)
    out_per_group, in_per_group, *spatial = kernel64.shape
    out_per_group //= groups
    full = min(out_per_group, in_per_group * int(np.prod(spatial)))
    rank = check_rank(method, rank, full, kernel64.shape, groups=groups)
    ones = [1] * len(spatial)

    def factor_one(block: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        left, right, values = lowrank(block.reshape(out_per_group, -1), rank)
        return [right.reshape(rank, in_per_group, *spatial), left.reshape(out_per_group, rank, *ones)], values

    results = per_group(kernel64, groups, factor_one)
    return build(
        SVDFactors,
        kernel64,
        method="svd",
        shape=tuple(kernel64.shape),
        ranks=(rank,),
        stages=stack_groups([stages for stages, _ in results]),
        groups_per_stage=(groups, groups),
        groups=groups,
        singular_values=tuple(values for _, values in results),
    )


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
    method = "spatial_svd"
    kernel64 = check_kernel(method, kernel, spatial_dims=(2,))
    groups = check_groups(method, groups, kernel64.shape)
    out_channels, in_per_group, kh, kw = kernel64.shape
    out_per_group = out_channels // groups
    rank = check_rank(method, rank, min(in_per_group * kh, out_per_group * kw), kernel64.shape, groups=groups)

    def factor_one(block: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        matrix = block.transpose(1, 2, 0, 3).reshape(in_per_group * kh, out_per_group * kw)
        left, right, values = lowrank(matrix, rank)
        first = left.T.reshape(rank, in_per_group, kh, 1)
        second = right.reshape(rank, out_per_group, kw).transpose(1, 0, 2)[:, :, None, :]
        return [first, second], values

    results = per_group(kernel64, groups, factor_one)
    return build(
        SVDFactors,
        kernel64,
        method="spatial-svd",
        shape=tuple(kernel64.shape),
        ranks=(rank,),
        stages=stack_groups([stages for stages, _ in results]),
        groups_per_stage=(groups, groups),
        groups=groups,
        singular_values=tuple(values for _, values in results),
    )


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
    if not isinstance(tiles, tuple | list) or len(tiles) != 2:
        raise ValueError(f"{method}: tiles must be a pair (row tiles, column tiles), found {tiles!r}")
    rows = check_int(method, "row tiles", tiles[0])
    cols = check_int(method, "column tiles", tiles[1])
    out_channels, in_channels, *spatial = kernel64.shape
    if out_channels % rows:
        raise ValueError(f"{method}: {rows} row tiles do not divide {out_channels} output channels")
    if in_channels % cols:
        raise ValueError(f"{method}: {cols} column tiles do not divide {in_channels} input channels")
    tile_out, tile_in = out_channels // rows, in_channels // cols
    full = min(tile_out, tile_in * int(np.prod(spatial)))
    rank = check_rank(method, rank, full, kernel64.shape, what=f"kernel's {rows}x{cols} tiles")

    first = np.empty((cols, rows, rank, tile_in, *spatial))
    second = np.empty((rows, tile_out, cols, rank))
    values = [[np.empty(0)] * cols for _ in range(rows)]
    for i in range(rows):
        for j in range(cols):
            tile = kernel64[i * tile_out : (i + 1) * tile_out, j * tile_in : (j + 1) * tile_in]
            left, right, values[i][j] = lowrank(tile.reshape(tile_out, -1), rank)
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
