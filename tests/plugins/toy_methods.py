"""A factorization method defined outside the package: Tucker-1 on the input channels.

`W[t, s, k] ≈ Σ_r G[t, r, k] V[s, r]`: a pointwise Conv `[g·R, S/g, 1..]` (Vᵀ) then the core with
the original geometry `[T, R, k..]`. All it takes is this module and `register_method` (or an
entry point in the group `onnx_lowrank.methods`); the refit, the budget, the rewrite, the report
and the CLI come from the package.
"""

import math

from onnx_lowrank import RankedMethod
from onnx_lowrank.factorize import spectra, tucker2
from onnx_lowrank.methods.base import placeholder
from onnx_lowrank.ranks import ModeSpectrum
from onnx_lowrank.rewrite.chain import Chain, ConvStage


class InputTucker1(RankedMethod):
    name = "tucker1-in"

    def full_ranks(self, layer):
        return (layer.weight.shape[1],)

    def template(self, layer, ranks):
        (r,) = ranks
        g = layer.conv.group
        t, s_g, *kernel = layer.weight.shape
        return Chain(self.name, ranks, (ConvStage(placeholder(g * r, s_g, *[1] * len(kernel)), g, "point"),
                                        ConvStage(placeholder(t, r, *kernel), g, "full")))

    def spectra(self, layer, stats=None):
        t, s_g, *kernel = layer.weight.shape
        g = layer.conv.group
        return (ModeSpectrum(tuple(spectra.input_mode_spectra(layer.weight, g)), (s_g, t // g * math.prod(kernel))),)

    def weights(self, layer, ranks, stats=None):
        return tucker2(layer.weight, (None, ranks[0]), groups=layer.conv.group).weights

    def project(self, weight, rank, groups=1):
        return tucker2(weight, (None, int(rank)), groups=groups).to_tensor()

