"""onnx-lowrank: post-training low-rank compression of ONNX models, proven with ONNX Runtime.

The public API::

    from onnx_lowrank import Settings, compress, inspect, validate_models, project
    workspace = compress("model.onnx", "small.onnx", Settings(method="tucker2", target_macs=0.5))
"""

__version__ = "0.1.0"

from onnx_lowrank.api import compress, inspect  # noqa: E402
from onnx_lowrank.config import Settings  # noqa: E402
from onnx_lowrank.errors import BoundError, InputError  # noqa: E402
from onnx_lowrank.factorize import project  # noqa: E402
from onnx_lowrank.ranks import VBMF, Energy, FixedRank, RankRatio  # noqa: E402
from onnx_lowrank.validate import validate_models  # noqa: E402

__all__ = [
    "VBMF", "BoundError", "Energy", "FixedRank", "InputError", "RankRatio", "Settings", "compress",
    "inspect", "project", "validate_models",
]
