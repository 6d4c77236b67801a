"""Shared test helpers: tiny model builders, an onnxruntime runner, numerical equality."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

FULL_RANK_RTOL = 1e-5  # float32 rounding of a few chained products, relative to the output norm


def make_model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model).graph.output
    for output, typed in zip(model.graph.output, inferred):
        if typed.type.tensor_type.HasField("shape"):
            output.type.CopyFrom(typed.type)
    return model


def conv_model(input_shape, weight, bias=None, op="Conv", dynamic_batch=False, **attrs):
    """A one-node Conv/ConvTranspose model: input `x`, output `y`, weight `W`, bias `B`."""
    inits = [numpy_helper.from_array(weight.astype(np.float32), "W")]
    names = ["x", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "B"))
        names.append("B")
    shape = ["N", *input_shape[1:]] if dynamic_batch else list(input_shape)
    node = helper.make_node(op, names, ["y"], name="layer", **attrs)
    return make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def gemm_model(a_shape, b, c=None, **attrs):
    inits = [numpy_helper.from_array(b.astype(np.float32), "B")]
    names = ["a", "B"]
    if c is not None:
        inits.append(numpy_helper.from_array(c.astype(np.float32), "C"))
        names.append("C")
    node = helper.make_node("Gemm", names, ["y"], name="layer", **attrs)
    return make_model([node], [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a_shape))],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def matmul_model(x_shape, w, side="right"):
    inits = [numpy_helper.from_array(w.astype(np.float32), "W")]
    names = ["x", "W"] if side == "right" else ["W", "x"]
    node = helper.make_node("MatMul", names, ["y"], name="layer")
    return make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def _checked(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def linear_model(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """y = x @ w + b with Gemm; x [N, in], y [N, out]."""
    return _checked(helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]))


def classifier_model(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """Conv(3->4, 3x3, pad 1) + Relu + GlobalAveragePool + Flatten + Gemm(4->classes); image [N,3,8,8]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("conv_w", (4, 3, 3, 3)), ("conv_b", (4,)), ("fc_w", (classes, 4)),
                                 ("fc_b", (classes,)))]
    nodes = [helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1)]
    return _checked(helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], initializer=inits))


def unary_model(op_types, shape, out_name: str = "y") -> onnx.ModelProto:
    """y = op_k(...op_1(x)) on a tensor of `shape`."""
    nodes, prev = [], "x"
    for i, op in enumerate(op_types):
        out = out_name if i == len(op_types) - 1 else f"t{i}"
        nodes.append(helper.make_node(op, [prev], [out]))
        prev = out
    return _checked(helper.make_graph(
        nodes, "unary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, shape)]))


def add_const_model(const: np.ndarray, name: str = "pred") -> onnx.ModelProto:
    """name = x + const (const's shape)."""
    return _checked(helper.make_graph(
        [helper.make_node("Add", ["x", "c"], [name])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(const.shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(const.shape))],
        initializer=[numpy_helper.from_array(const, "c")]))


def bad_reshape_model() -> onnx.ModelProto:
    """Loads in onnxruntime but fails on every run: x [1, 4] reshaped to [3, 3]."""
    shape = numpy_helper.from_array(np.array([3, 3], np.int64), "shape")
    return _checked(helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "bad_reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])], initializer=[shape]))


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    norm = np.linalg.norm(reference)
    return float(np.linalg.norm(reference - candidate) / (norm if norm > 0 else 1.0))


def assert_numerically_equal(original, rewritten, feed, rtol=FULL_RANK_RTOL):
    """Both models run in onnxruntime; every output agrees to `rtol` relative L2 error."""
    for expected, actual in zip(run(original, feed), run(rewritten, feed), strict=True):
        assert expected.shape == actual.shape
        assert relative_error(expected, actual) < rtol


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def prepared(model, input_shapes=(), **settings):
    """The workspace after the canonical form and layer discovery (what `inspect` runs)."""
    from onnx_lowrank.config import Settings
    from onnx_lowrank.passes import Workspace, inspect_pipeline

    loaded = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    workspace = Workspace(original=loaded, model=loaded,
                          settings=Settings(input_shape=tuple(input_shapes), **settings))
    inspect_pipeline().run(workspace)
    return workspace


def fit(layer, method, policy=None, ranks=None, stats=None, **settings):
    """`fitting.fit_layer` of `layer` by the method serving it when `method` is asked for."""
    from onnx_lowrank.config import Settings
    from onnx_lowrank.fitting import fit_layer
    from onnx_lowrank.methods import MethodSet

    serving = MethodSet(Settings(method=method, **settings)).serving(method, layer)
    return fit_layer(layer, serving, ranks=ranks, policy=policy, stats=stats)
