"""Torch modules built by the tools, exported to ONNX the one way the benchmarks need."""

from __future__ import annotations

import os
import pathlib

#: The newest ONNX IR version the benchmarks' onnxruntime loads.
MAX_IR_VERSION = 10


def export_torch(model, example, path, input_name: str, output_name: str) -> pathlib.Path:
    """Export a torch module to ONNX at `path` (TorchScript exporter, opset 17, dynamic batch,
    IR version at most `MAX_IR_VERSION`), checked, written to a temporary name and renamed into
    place so an interrupted export leaves no partial model. Returns `path`."""
    import onnx
    import torch

    path = pathlib.Path(path)
    tmp = path.with_suffix(".onnx.tmp")
    torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=17,
                      input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, do_constant_folding=True)
    proto = onnx.load(str(tmp))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path
