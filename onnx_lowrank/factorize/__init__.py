"""Arrays in, factors out: low-rank factorizations of Conv, Gemm and MatMul weights.

Each function takes a weight (conv kernels in ONNX layout ``[T, S/g, k1..kN]``), the
``groups`` of the Conv and the rank(s), and returns a frozen result whose ``weights`` are the
float32 initializers of the replacing chain's stages, in order, with ``groups_per_stage``.
This package never imports onnx.
"""

from .base import ConvFactors, Factors, NumericalError, compose_chain
from .cp import CPFactors, cp, cp_depthwise
from .svd import MatrixFactors, SVDFactors, TiledSVDFactors, channel_svd, spatial_svd, tiled_svd, truncated_svd
from .tucker import TuckerFactors, hosvd_error_bound, tucker2

__all__ = [
    "CPFactors",
    "ConvFactors",
    "Factors",
    "MatrixFactors",
    "NumericalError",
    "SVDFactors",
    "TiledSVDFactors",
    "TuckerFactors",
    "channel_svd",
    "compose_chain",
    "cp",
    "cp_depthwise",
    "hosvd_error_bound",
    "spatial_svd",
    "tiled_svd",
    "truncated_svd",
    "tucker2",
]
