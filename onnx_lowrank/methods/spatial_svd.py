""""spatial-svd": a `kh x kw` Conv as `kh x 1` then `1 x kw` (Jaderberg et al. scheme 2; rewrites.md §3).

Per group, `M[(s, i), (t, j)] = W[t, s, i, j]` (`(S/g)·kh x (T/g)·kw`) is truncated to rank r:
the first Conv `[g·r, S/g, kh, 1]` takes the stride, dilation and pads of H, the second
`[T, r, 1, kw]` those of W and the bias. With calibration statistics the rows are whitened by
the vertical patches' second moments (`factorize.whiten.whitened_spatial_svd`).
"""

from __future__ import annotations

from onnx_lowrank import factorize
from onnx_lowrank.factorize import spectra, whiten
from onnx_lowrank.methods.base import ConvMethod, placeholder, spectrum_of
from onnx_lowrank.rewrite.chain import Chain, ConvStage

__all__ = ["SpatialSVD"]


class SpatialSVD(ConvMethod):
    """Spatial SVD of 2-D convolutions."""

    name = "spatial-svd"
    in_auto = True

    def not_applicable(self, layer):
        if layer.weight.ndim != 4:
            return f"spatial SVD needs a 2-D kernel; this one is {layer.weight.ndim - 2}-D"
        return None

    def _shape(self, layer) -> tuple[int, int]:
        t, s_g, kh, kw = layer.weight.shape
        return s_g * kh, t // layer.conv.group * kw

    def full_ranks(self, layer):
        """`min((S/g)·kh, (T/g)·kw)`."""
        return (min(self._shape(layer)),)

    def template(self, layer, ranks):
        (r,) = ranks
        g = layer.conv.group
        t, s_g, kh, kw = layer.weight.shape
        return Chain(self.name, ranks, (ConvStage(placeholder(g * r, s_g, kh, 1), g, "axis", 0),
                                        ConvStage(placeholder(t, r, 1, kw), g, "axis", 1)))

    def spectra(self, layer, stats=None):
        g = layer.conv.group
        if stats is None:
            return (spectrum_of(spectra.spatial_spectra(layer.weight, g), self._shape(layer)),)
        fitted = whiten.whitened_spatial_svd(layer.weight, g, 1, stats, eps=whiten.shrinkage(stats))
        return (spectrum_of(fitted.singular_values, self._shape(layer)),)

    def factor_kernel(self, kernel, groups, ranks, stats=None):
        if stats is None:
            return factorize.spatial_svd(kernel, ranks[0], groups=groups)
        return whiten.whitened_spatial_svd(kernel, groups, ranks[0], stats, eps=whiten.shrinkage(stats))
