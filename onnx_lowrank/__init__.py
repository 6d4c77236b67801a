"""onnx-lowrank: post-training low-rank compression of ONNX models, proven with ONNX Runtime."""

__version__ = "0.1.0"
