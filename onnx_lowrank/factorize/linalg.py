"""Dense linear algebra of the data-aware fits: ridges, Cholesky solves, the whitened SVD.

This module never imports onnx; it is deterministic (no random numbers).
"""

from __future__ import annotations

import numpy as np

from .base import NumericalError, check_matrix, check_rank, fmt_shape
from .svd import lowrank

__all__ = ["check_square", "regression_target", "regularized", "solve_spd", "whitened_svd"]

# Cholesky retries: when a covariance is not numerically positive definite even after the
# relative regularisation, eps is multiplied by this factor, at most this many times.
_CHOL_GROWTH = 100.0
_CHOL_RETRIES = 2


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


def solve_spd(method: str, matrix: np.ndarray, rhs_rows: np.ndarray) -> np.ndarray:
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
    sigma64 = check_square(method, "sigma", sigma, matrix.shape[1])
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
    cov_xt = check_square(method, "cov_xt", cov_xt, W64.shape[1])
    cov_tt = check_square(method, "cov_tt", cov_tt, W64.shape[1])
    shrunk = regularized(cov_tt, eps)
    # Ridge towards W itself: (W Sxt + λ W)(Stt + λ I)^-1, so a small calibration set moves W little.
    return solve_spd(method, shrunk, W64 @ cov_xt + W64 @ (shrunk - cov_tt))


def check_square(method: str, name: str, matrix: object, dim: int) -> np.ndarray:
    """``matrix`` as a finite float64 ``[dim, dim]`` array, or a ValueError naming it."""
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape != (dim, dim):
        raise ValueError(f"{method}: expected {name} of shape [{dim}, {dim}], found {fmt_shape(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{method}: {name} holds NaN or Inf values")
    return array

