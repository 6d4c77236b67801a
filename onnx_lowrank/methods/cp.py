""""cp" and "cp-depthwise": CP decompositions of N-D convolutions (Lebedev et al. 2015; rewrites.md §6).

`W[t, s, k1..kN] ≈ Σ_r λ_r At[t, r] As[s, r] A1[k1, r] ··· AN[kN, r]` becomes a pointwise Conv
`[g·R, S/g, 1..]`, one depthwise Conv per spatial dimension (kernel `k_n` along dimension n,
group `g·R`, that dimension's stride, dilation and pads) and a pointwise Conv `[T, R, 1..]`.
"cp-depthwise" flattens the spatial modes (3-way CP of `T x S x Πk`): one depthwise `k1 x .. x kN`
Conv, the MobileNet block. CP has no finite exact rank in general and no spectrum of its own;
the reference rank is `max(T/g, S/g)` and the spectrum the channel SVD's, i.e. Tucker's output mode (a rank-R CP is
a Tucker-(R, R) with a diagonal core, so its error is no smaller). With calibration statistics
the factorization stays weight-only and only the last factor is refit (`onnx_lowrank.fitting`).
"""

from __future__ import annotations

import dataclasses

from onnx_lowrank import factorize
from onnx_lowrank.factorize.cp import max_cp_rank
from onnx_lowrank.methods.base import ConvMethod, placeholder
from onnx_lowrank.methods.svd import ChannelSVD
from onnx_lowrank.rewrite.chain import Chain, ConvStage

__all__ = ["CP", "CPDepthwise"]


@dataclasses.dataclass(frozen=True)
class CP(ConvMethod):
    """CP with one depthwise Conv per spatial dimension; ALS initialised from `seed`."""

    seed: int = 0
    name = "cp"
    sample_space = True
    flatten = False

    def configure(self, settings):
        return dataclasses.replace(self, seed=settings.seed)

    def full_ranks(self, layer):
        """`max(T/g, S/g)`, capped at the largest rank the factorizer accepts (`max_cp_rank`)."""
        t, s_g = layer.weight.shape[:2]
        bound = max_cp_rank(layer.weight.shape, layer.conv.group, flatten=self.flatten)
        return (min(max(t // layer.conv.group, s_g), bound),)

    def _depthwise(self, groups: int, kernel: list[int]) -> tuple[ConvStage, ...]:
        return tuple(ConvStage(placeholder(groups, 1, *[k if i == d else 1 for i, k in enumerate(kernel)]),
                               groups, "axis", d) for d in range(len(kernel)))

    def template(self, layer, ranks):
        (r,) = ranks
        g = layer.conv.group
        t, s_g, *kernel = layer.weight.shape
        ones = [1] * len(kernel)
        return Chain(self.name, ranks, (ConvStage(placeholder(g * r, s_g, *ones), g, "point"),
                                        *self._depthwise(g * r, kernel),
                                        ConvStage(placeholder(t, r, *ones), g, "point")))

    def spectra(self, layer, stats=None):
        """The channel SVD's spectrum, i.e. the Tucker output mode's (a proxy; see the module)."""
        return ChannelSVD().spectra(layer, stats)

    def factor_kernel(self, kernel, groups, ranks, stats=None):
        return factorize.cp(kernel, ranks[0], groups=groups, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class CPDepthwise(CP):
    """CP of the kernel with its spatial modes flattened: pointwise, one depthwise, pointwise."""

    name = "cp-depthwise"
    flatten = True

    def _depthwise(self, groups, kernel):
        return (ConvStage(placeholder(groups, 1, *kernel), groups, "full"),)

    def factor_kernel(self, kernel, groups, ranks, stats=None):
        return factorize.cp_depthwise(kernel, ranks[0], groups=groups, seed=self.seed)
