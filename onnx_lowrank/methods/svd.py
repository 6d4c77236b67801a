""""svd": truncated SVD of Gemm/MatMul weights, channel SVD of convolutions (rewrites.md §1-2).

Matrix `M [K, N] ≈ P Q` becomes two products (`MatMul`/`Gemm` pairs); a kernel `W [T, S/g, k..]`
viewed per group as `T/g x (S/g)·Πk` becomes a Conv with the original geometry into r channels
then a pointwise Conv; a ConvTranspose weight `W[s, (t, k)] ≈ Σ_r P[s, r] F[r, t, k]` becomes a
pointwise Conv at the input resolution then a ConvTranspose. With calibration statistics the
truncation is the whitened SVD (SVD-LLM): it minimises the layer's output error, not the weight's.
"""

from __future__ import annotations

import math

import numpy as np

from onnx_lowrank import factorize
from onnx_lowrank.factorize import spectra, whiten
from onnx_lowrank.graph import Layer
from onnx_lowrank.methods.base import ConvMethod, placeholder, spectrum_of, swap_channels
from onnx_lowrank.ranks import ModeSpectrum
from onnx_lowrank.rewrite.chain import Chain, ConvStage, MatMulStage

__all__ = ["ChannelSVD", "whitened_matrix"]


class ChannelSVD(ConvMethod):
    """Truncated SVD of matrices and channel SVD of (transposed) convolutions."""

    name = "svd"
    in_auto = True
    sample_space = True

    def resolve(self, layer):
        return self.name

    def full_ranks(self, layer):
        """`min(K, N)` of a matrix; `min(T/g, (S/g)·Πk)` of a kernel; `min(S/g, (T/g)·Πk)` of a
        ConvTranspose weight `[S, T/g, k..]`."""
        if layer.op in ("Gemm", "MatMul"):
            return (min(layer.matrix().shape),)
        if layer.op == "ConvTranspose":
            s, t_g, *kernel = layer.weight.shape
            return (min(s // layer.conv.group, t_g * math.prod(kernel)),)
        t, s_g, *kernel = layer.weight.shape
        return (min(t // layer.conv.group, s_g * math.prod(kernel)),)

    def template(self, layer, ranks):
        """Matrices `[K, r]`, `[r, N]` (`[r, N]`, `[M, r]` for a weight on the left); kernels
        `[g·r, S/g, k..]` (full geometry), `[T, r, 1..]`; ConvTranspose `[g·r, S/g, 1..]`, then
        the transposed `[g·r, T/g, k..]`."""
        (r,) = ranks
        if layer.op in ("Gemm", "MatMul"):
            rows, cols = layer.matrix().shape
            if layer.weight_side == "left":
                stages = (MatMulStage(placeholder(r, cols), "left"), MatMulStage(placeholder(rows, r), "left"))
            else:
                stages = (MatMulStage(placeholder(rows, r)), MatMulStage(placeholder(r, cols)))
            return Chain(self.name, ranks, stages)
        g = layer.conv.group
        if layer.op == "ConvTranspose":
            s, t_g, *kernel = layer.weight.shape
            stages = (ConvStage(placeholder(g * r, s // g, *[1] * len(kernel)), g, "point"),
                      ConvStage(placeholder(g * r, t_g, *kernel), g, "full", transpose=True))
            return Chain(self.name, ranks, stages)
        t, s_g, *kernel = layer.weight.shape
        return Chain(self.name, ranks, (ConvStage(placeholder(g * r, s_g, *kernel), g, "full"),
                                        ConvStage(placeholder(t, r, *[1] * len(kernel)), g, "point")))

    def spectra(self, layer, stats=None):
        """The matrix's, or per group the lowered kernel's, singular values; with `stats`, those
        of the whitened weight `W·L` (`L Lᵀ` the input second moment), whose discarded energy is
        the relative output error."""
        if layer.op in ("Gemm", "MatMul"):
            shape = layer.matrix().shape
            values = (spectra.matrix_spectrum(layer.matrix())[0] if stats is None
                      else whitened_matrix(layer, stats, 1)[2])
            return (spectrum_of((values,), shape),)
        g = layer.conv.group
        if layer.op == "ConvTranspose":
            s, t_g, *kernel = layer.weight.shape
            return (ModeSpectrum(tuple(spectra.lowered_spectra(layer.weight, g)), (s // g, t_g * math.prod(kernel))),)
        t, s_g, *kernel = layer.weight.shape
        shape = (t // g, s_g * math.prod(kernel))
        if stats is None:
            return (ModeSpectrum(tuple(spectra.lowered_spectra(layer.weight, g)), shape),)
        fitted = whiten.whitened_channel_svd(layer.weight, g, 1, stats, eps=whiten.shrinkage(stats))
        return (spectrum_of(fitted.singular_values, shape),)

    def weights(self, layer, ranks, stats=None):
        if layer.op in ("Gemm", "MatMul"):
            return _matrix_weights(layer, ranks[0], stats)
        if layer.op == "ConvTranspose":
            g = layer.conv.group
            kernel_part, channel_part = factorize.channel_svd(layer.weight, ranks[0], groups=g).weights
            return swap_channels(channel_part, g), kernel_part
        return super().weights(layer, ranks, stats)

    def factor_kernel(self, kernel, groups, ranks, stats=None):
        if stats is None:
            return factorize.channel_svd(kernel, ranks[0], groups=groups)
        return whiten.whitened_channel_svd(kernel, groups, ranks[0], stats, eps=whiten.shrinkage(stats))





def whitened_matrix(layer: Layer, stats, rank: int):
    """Whitened SVD `(A, B, singular values)` of a Gemm/MatMul weight as the map `y = W_rows · x`.

    A weight on the right (`x·W`) maps rows through `Wᵀ`; a weight on the left (`W·X`) maps
    the columns of X through W.
    """
    matrix = layer.matrix()
    lowered = matrix if layer.weight_side == "left" else matrix.T
    return whiten.whitened_rows(lowered, stats, rank, eps=whiten.shrinkage(stats))


def _matrix_weights(layer: Layer, rank: int, stats) -> tuple[np.ndarray, np.ndarray]:
    """The two product weights in chain order: `x·P·Q`, or `P·(Q·X)` for a weight on the left."""
    if stats is None:
        factors = factorize.truncated_svd(layer.matrix(), rank)
        left, right = factors.left, factors.right
    else:
        a, b, _ = whitened_matrix(layer, stats, rank)
        left, right = (a, b) if layer.weight_side == "left" else (b.T, a.T)
    return (right, left) if layer.weight_side == "left" else (left, right)

