"""onnx-lowrank: post-training low-rank compression of ONNX models, proven with ONNX Runtime.

The public API::

    from onnx_lowrank import Settings, compress
    result = compress("model.onnx", "small.onnx", Settings(method="tucker2", target_macs=0.5))
    result.totals_after, result.validation, [layer.status for layer in result.layers]

Extension points: `Method` and `register_method` (a factorization; also the entry-point group
``onnx_lowrank.methods``), `Pass` and `Pipeline` (`default_pipeline(settings)` to extend with
`insert_before` / `insert_after`, then `compress(..., passes=pipeline)`).
"""

__version__ = "0.1.0"

from onnx_lowrank.api import CompressionResult, InspectResult, LayerResult, compress, inspect, project  # noqa: E402
from onnx_lowrank.config import Settings  # noqa: E402
from onnx_lowrank.errors import BoundError, InputError, InternalError  # noqa: E402
from onnx_lowrank.methods import Method, RankedMethod, register_method  # noqa: E402
from onnx_lowrank.passes import Pass, PassResult, Pipeline, Workspace, default_pipeline  # noqa: E402
from onnx_lowrank.validate import validate_models  # noqa: E402

__all__ = [
    "BoundError", "CompressionResult", "InputError", "InspectResult", "InternalError", "LayerResult", "Method",
    "Pass", "PassResult", "Pipeline", "RankedMethod", "Settings", "Workspace", "compress", "default_pipeline",
    "inspect", "project", "register_method", "validate_models",
]
