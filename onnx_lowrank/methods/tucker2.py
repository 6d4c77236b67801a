""""tucker2": Tucker-2 on the channel modes (Kim et al. 2016; rewrites.md §5).

`W ≈ G ×_0 U ×_1 V` per group: a pointwise Conv `[g·Rs, S/g, 1..]` (Vᵀ), the core
`[g·Rt, Rs, k..]` with the original geometry, and a pointwise Conv `[T, Rt, 1..]` (U, bias).
A ConvTranspose `W[s, t, k] ≈ Σ V[s, rs] G[rs, rt, k] U[t, rt]` keeps the transposed core
between the two pointwise convolutions. With calibration statistics the output factor is the
PCA of the layer's output and the input factor that of its input channels
(`factorize.whiten.data_tucker2`). Error curves use the HOSVD bound (De Lathauwer et al. 2000).
"""

from __future__ import annotations

import math

from onnx_lowrank import factorize
from onnx_lowrank.factorize import spectra, whiten
from onnx_lowrank.methods.base import ConvMethod, conv_layout, placeholder, spectrum_of, swap_channels
from onnx_lowrank.ranks import ModeSpectrum, rank_grid, tucker_error_curve
from onnx_lowrank.rewrite.chain import Chain, ConvStage

__all__ = ["Tucker2"]

#: The Tucker rank pairs a budget considers keep the two modes' relative ranks within this factor.
MODE_BALANCE = 2.0


class Tucker2(ConvMethod):
    """Tucker-2 of (transposed) convolutions."""

    name = "tucker2"
    in_auto = True

    def full_ranks(self, layer):
        """`(T/g, S/g)`."""
        t, s_g = conv_layout(layer).shape[:2]
        return (t // layer.conv.group, s_g)

    def template(self, layer, ranks):
        rt, rs = ranks
        g = layer.conv.group
        if layer.op == "ConvTranspose":
            s, t_g, *kernel = layer.weight.shape
            ones = [1] * len(kernel)
            return Chain(self.name, ranks, (ConvStage(placeholder(g * rs, s // g, *ones), g, "point"),
                                            ConvStage(placeholder(g * rs, rt, *kernel), g, "full", transpose=True),
                                            ConvStage(placeholder(t_g * g, rt, *ones), g, "point")))
        t, s_g, *kernel = layer.weight.shape
        ones = [1] * len(kernel)
        return Chain(self.name, ranks, (ConvStage(placeholder(g * rs, s_g, *ones), g, "point"),
                                        ConvStage(placeholder(g * rt, rs, *kernel), g, "full"),
                                        ConvStage(placeholder(t, rt, *ones), g, "point")))

    def spectra(self, layer, stats=None):
        """The output mode's spectrum (per group, the lowered kernel's; with `stats`, that of the
        output second moment) and the input mode's (the weight's: a heuristic for the budget)."""
        weight, g = conv_layout(layer), layer.conv.group
        t, s_g, *kernel = weight.shape
        taps = math.prod(kernel)
        output_mode = ModeSpectrum(tuple(spectra.lowered_spectra(weight, g)), (t // g, s_g * taps))
        input_mode = ModeSpectrum(tuple(spectra.input_mode_spectra(weight, g)), (s_g, t // g * taps))
        if stats is None:
            return output_mode, input_mode
        fitted = whiten.data_tucker2(layer.weight, g, (1, 1), stats, eps=whiten.shrinkage(stats)).mode_spectra
        return spectrum_of([out for out, _ in fitted], output_mode.shape), input_mode

    def error_curve(self, layer, spectra, multiple):
        """HOSVD bound over rank pairs whose relative ranks are within `MODE_BALANCE` of each other."""
        full = self.full_ranks(layer)
        grids = [rank_grid(f, multiple) for f in full]
        pairs = [(rt, rs) for rt in grids[0] for rs in grids[1]
                 if 1 / MODE_BALANCE <= (rt / full[0]) / (rs / full[1]) <= MODE_BALANCE]
        return list(zip(pairs, tucker_error_curve(spectra[0], spectra[1], pairs), strict=True))

    def weights(self, layer, ranks, stats=None):
        if layer.op == "ConvTranspose":
            g = layer.conv.group
            first, core, last = factorize.tucker2(conv_layout(layer), ranks, groups=g).weights
            return first, swap_channels(core, g), last
        return super().weights(layer, ranks, stats)

    def rank_tuple(self, rank, kernel, groups):
        """An int is both ranks; each capped at its mode's full rank."""
        ranks = (rank, rank) if isinstance(rank, int) else tuple(rank)
        return min(ranks[0], kernel.shape[0] // groups), min(ranks[1], kernel.shape[1])

    def factor_kernel(self, kernel, groups, ranks, stats=None):
        if stats is None:
            return factorize.tucker2(kernel, ranks, groups=groups)
        return whiten.data_tucker2(kernel, groups, ranks, stats, eps=whiten.shrinkage(stats))
