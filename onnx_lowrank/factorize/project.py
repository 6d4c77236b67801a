"""Projection onto low-rank weights: factorize, then reconstruct, keeping the weight's shape.

This is the weight-distortion step of low-rank-aware training (Lee et al., "Learning Low-Rank
Approximation for CNNs", DeepTwist): a training loop in any framework calls `project` on its
weights every few steps, and the network learns to live with the approximation.
"""

from __future__ import annotations

import numpy as np

from .cp import cp, cp_depthwise
from .svd import channel_svd, spatial_svd, tiled_svd, truncated_svd
from .tucker import tucker2

__all__ = ["project"]


def project(weight: np.ndarray, method: str, rank: int | tuple[int, int], groups: int = 1,
            tiles: tuple[int, int] = (2, 2), seed: int = 0) -> np.ndarray:
    """`W -> Ŵ`, the reconstruction of `method`'s rank-`rank` factorization, same shape and dtype.

    A 2-D weight is a matrix (truncated SVD, `Ŵ = U_r Σ_r V_rᵀ`, whatever the method); a conv
    kernel `[T, S/g, k..]` takes "svd" (channel SVD), "spatial-svd", "tiled-svd" (`tiles`),
    "tucker2" (`rank` an int for both modes or `(Rt, Rs)`), "cp" or "cp-depthwise" (`seed`).
    """
    weight = np.asarray(weight)
    if weight.ndim == 2:
        return truncated_svd(weight, int(rank)).to_tensor().astype(weight.dtype)
    if method == "tucker2":
        ranks = (rank, rank) if isinstance(rank, int) else tuple(rank)
        t, s = weight.shape[0] // groups, weight.shape[1]
        factors = tucker2(weight, (min(ranks[0], t), min(ranks[1], s)), groups=groups)
    elif method == "svd":
        factors = channel_svd(weight, int(rank), groups=groups)
    elif method == "spatial-svd":
        factors = spatial_svd(weight, int(rank), groups=groups)
    elif method == "tiled-svd":
        factors = tiled_svd(weight, tiles, int(rank))
    elif method == "cp":
        factors = cp(weight, int(rank), groups=groups, seed=seed)
    elif method == "cp-depthwise":
        factors = cp_depthwise(weight, int(rank), groups=groups, seed=seed)
    else:
        raise ValueError(f"project: unknown method '{method}'; expected svd, spatial-svd, tiled-svd, "
                         "tucker2, cp or cp-depthwise")
    return factors.to_tensor().astype(weight.dtype)
