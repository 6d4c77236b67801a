""""tiled-svd": the lowered kernel cut into a x b tiles, each truncated (Lee et al.; rewrites.md §4).

`a` row tiles split the T output channels, `b` column tiles the S input channels; tile (i, j) is
`A_ij B_ij` at rank r. The chain is a grouped Conv (group b, `[b·a·r, S/b, k..]`), a channel
shuffle when a > 1 and b > 1, and a grouped pointwise Conv (group a, `[T, b·r, 1..]`). With
calibration statistics each tile is whitened by its column tile's patch second moments.
"""

from __future__ import annotations

import dataclasses
import math

from onnx_lowrank import factorize
from onnx_lowrank.factorize import spectra, whiten
from onnx_lowrank.methods.base import ConvMethod, placeholder, spectrum_of
from onnx_lowrank.rewrite.chain import Chain, ConvStage, ShuffleStage

__all__ = ["TiledSVD"]


@dataclasses.dataclass(frozen=True)
class TiledSVD(ConvMethod):
    """Tiled SVD of ungrouped convolutions on a `tiles` = (a, b) grid (`--tiles AxB`)."""

    tiles: tuple[int, int] = (2, 2)
    name = "tiled-svd"
    sample_space = True

    def configure(self, settings):
        return dataclasses.replace(self, tiles=tuple(settings.tiles))

    def not_applicable(self, layer):
        if layer.conv.group != 1:
            return f"tiled SVD needs an ungrouped convolution; this one has {layer.conv.group} groups"
        t, s = layer.weight.shape[:2]
        if t % self.tiles[0] or s % self.tiles[1]:
            return (f"tiled SVD: {self.tiles[0]}x{self.tiles[1]} tiles do not divide {t} output and {s} input "
                    "channels; no channel may be dropped")
        return None

    def _shape(self, layer) -> tuple[int, int]:
        a, b = self.tiles
        t, s, *kernel = layer.weight.shape
        return t // a, s // b * math.prod(kernel)

    def full_ranks(self, layer):
        """`min(T/a, (S/b)·Πk)` per tile."""
        return (max(1, min(self._shape(layer))),)

    def template(self, layer, ranks):
        (r,) = ranks
        a, b = self.tiles
        t, s, *kernel = layer.weight.shape
        shuffle = (ShuffleStage(outer=b, inner=a, per=r),) if a > 1 and b > 1 else ()
        return Chain(self.name, ranks, (ConvStage(placeholder(b * a * r, s // b, *kernel), b, "full"), *shuffle,
                                        ConvStage(placeholder(t, b * r, *[1] * len(kernel)), a, "point")))

    def spectra(self, layer, stats=None):
        """Per tile (i, j), the singular values of its lowered block (whitened with `stats`)."""
        if stats is None:
            return (spectrum_of(spectra.tile_spectra(layer.weight, self.tiles), self._shape(layer)),)
        fitted = whiten.whitened_tiled_svd(layer.weight, self.tiles, 1, stats, eps=whiten.shrinkage(stats))
        return (spectrum_of([v for row in fitted.singular_values for v in row], self._shape(layer)),)

    def factor_kernel(self, kernel, groups, ranks, stats=None):
        if stats is None:
            return factorize.tiled_svd(kernel, self.tiles, ranks[0], groups=groups)
        return whiten.whitened_tiled_svd(kernel, self.tiles, ranks[0], stats, eps=whiten.shrinkage(stats))
