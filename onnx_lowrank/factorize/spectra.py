"""Singular-value spectra of the unfoldings each method truncates, without factorizing.

Rank policies (energy, VBMF) and the budget allocator read error-versus-rank curves from these:
by Eckart–Young the squared error of a rank-r truncation of a matrix is the sum of its discarded
squared singular values, and the HOSVD error of a Tucker-2 truncation is bounded by the sum of
both modes' discarded energies (De Lathauwer et al., 2000). Each function returns one array of
singular values per group (or per tile), descending, float64.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["input_mode_spectra", "lowered_spectra", "matrix_spectrum", "spatial_spectra", "tile_spectra"]


def singular_values(matrix: np.ndarray) -> np.ndarray:
    """Singular values of `matrix`, descending, from the eigenvalues of its smaller Gram matrix."""
    matrix = np.asarray(matrix, dtype=np.float64)
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))


def matrix_spectrum(matrix: np.ndarray) -> list[np.ndarray]:
    """Spectrum of a Gemm/MatMul weight matrix (one "group")."""
    return [singular_values(matrix)]


def _groups(kernel: np.ndarray, groups: int) -> list[np.ndarray]:
    per = kernel.shape[0] // groups
    return [kernel[g * per:(g + 1) * per] for g in range(groups)]


def lowered_spectra(kernel: np.ndarray, groups: int = 1) -> list[np.ndarray]:
    """Per group, the spectrum of `W_g` viewed as `[T/g, (S/g)·Πk]` (channel SVD; Tucker's output mode)."""
    return [singular_values(block.reshape(block.shape[0], -1)) for block in _groups(kernel, groups)]


def input_mode_spectra(kernel: np.ndarray, groups: int = 1) -> list[np.ndarray]:
    """Per group, the spectrum of the input-channel unfolding `[S/g, (T/g)·Πk]` (Tucker's input mode)."""
    return [singular_values(np.moveaxis(block, 1, 0).reshape(block.shape[1], -1))
            for block in _groups(kernel, groups)]


def spatial_spectra(kernel: np.ndarray, groups: int = 1) -> list[np.ndarray]:
    """Per group, the spectrum of `M[(s,i),(t,j)] = W[t,s,i,j]`, `(S/g·kh) x (T/g·kw)` (spatial SVD)."""
    out = []
    for block in _groups(kernel, groups):
        t, s, kh, kw = block.shape
        out.append(singular_values(block.transpose(1, 2, 0, 3).reshape(s * kh, t * kw)))
    return out


def tile_spectra(kernel: np.ndarray, tiles: tuple[int, int]) -> list[np.ndarray]:
    """Per tile `(i, j)`, the spectrum of `W[i-th T block, j-th S block]` as `[T/a, (S/b)·Πk]`."""
    a, b = tiles
    t, s = kernel.shape[:2]
    rows, cols = t // a, s // b
    return [singular_values(kernel[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
                            .reshape(rows, cols * math.prod(kernel.shape[2:])))
            for i in range(a) for j in range(b)]
