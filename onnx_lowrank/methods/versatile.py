""""versatile" and "versatile-channel": versatile filters fitted after training (Wang et al. 2018; rewrites.md §7).

Spatial: groups of ceil(d/2) output filters share one `d x d` primary with nested centred masks,
emitted as one cropped Conv per mask level. Channel: a primary of S/2 channels slides over the
input channels with stride S/2 (a 3-D Conv over `[B, 1, S, H, W]`). No rank to choose: the
structure fixes the cost. Weight-only (no calibration statistics) and no refit.
"""

from __future__ import annotations

from onnx_lowrank.factorize import versatile
from onnx_lowrank.methods.base import Method
from onnx_lowrank.rewrite.chain import VersatileChain
from onnx_lowrank.rewrite.versatile import channel_versatile_reason, spatial_versatile_reason

__all__ = ["ChannelVersatile", "SpatialVersatile"]


class SpatialVersatile(Method):
    """Spatial versatile filters of 2-D convolutions with square kernels."""

    name = "versatile"

    def resolve(self, layer):
        return "svd" if super().resolve(layer) == "svd" else self.name

    def not_applicable(self, layer):
        return spatial_versatile_reason(layer)

    def uses_data(self, layer):
        return False

    def factors(self, weight, groups: int):
        """The fitted primaries and their assignment (`factorize.versatile.spatial_versatile`)."""
        return versatile.spatial_versatile(weight, groups)

    def build(self, layer, ranks=None, stats=None):
        factors = self.factors(layer.weight, layer.conv.group)
        return VersatileChain(self.name, tuple(factors.ranks), factors)

    def project(self, weight, rank=None, groups=1):
        """The fitted filters (`rank` is ignored: the structure fixes it)."""
        return self.factors(weight, groups).to_tensor()


class ChannelVersatile(SpatialVersatile):
    """Channel versatile filters: a primary of S/2 channels sliding with stride S/2."""

    name = "versatile-channel"

    def not_applicable(self, layer):
        reason = channel_versatile_reason(layer)
        if reason is None and (layer.weight.shape[1] - layer.weight.shape[1] // 2) % (layer.weight.shape[1] // 2):
            reason = (f"channel versatile filters: a primary of {layer.weight.shape[1] // 2} channels sliding with "
                      f"the same stride does not end on the last of {layer.weight.shape[1]} input channels")
        return reason

    def factors(self, weight, groups):
        half = weight.shape[1] // 2
        return versatile.channel_versatile(weight, half, half, groups=groups)
