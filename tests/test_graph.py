"""Layer discovery, canonicalization and MAC/parameter counts against hand-computed values."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_numerically_equal, conv_model, gemm_model, make_model, matmul_model, prepared, run
from onnx_lowrank import api
from onnx_lowrank.config import Settings
from onnx_lowrank.errors import InputError
from onnx_lowrank.graph import canonicalize


def only_layer(model, shapes=None):
    workspace = api.inspect(model, shapes)
    assert len(workspace.layers) == 1
    return workspace.layers[0]


def out_size(i, k, s, d, b, e):
    return (i + b + e - d * (k - 1) - 1) // s + 1


@pytest.mark.parametrize("dims,stride,dilation,groups,bias", [
    (1, 1, 1, 1, True), (1, 2, 3, 2, False), (2, 1, 1, 1, True), (2, 2, 2, 4, False),
    (2, 3, 1, 1, True), (3, 1, 1, 1, False), (3, 2, 2, 2, True),
])
def test_conv_macs_and_params(rng, dims, stride, dilation, groups, bias):
    t, s, kernel = 8, 8, (3, 2, 3)[:dims]
    spatial = (11, 9, 7)[:dims]
    pads = [1, 0, 2][:dims] + [0, 2, 1][:dims]
    weight = rng.standard_normal((t, s // groups, *kernel))
    model = conv_model((2, s, *spatial), weight, rng.standard_normal(t) if bias else None,
                       strides=[stride] * dims, dilations=[dilation] * dims, pads=pads, group=groups)
    layer = only_layer(model)
    out = [out_size(spatial[d], kernel[d], stride, dilation, pads[d], pads[dims + d]) for d in range(dims)]
    assert layer.output_shape == (2, t, *out)
    assert layer.macs == 2 * t * math.prod(out) * (s // groups) * math.prod(kernel)
    assert layer.params == weight.size + (t if bias else 0)
    assert layer.candidate


@pytest.mark.parametrize("auto_pad,stride", list(itertools.product(
    ["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET"], [1, 2])))
def test_auto_pad_is_made_explicit_without_changing_outputs(rng, auto_pad, stride):
    weight = rng.standard_normal((6, 3, 3, 4))
    model = conv_model((1, 3, 10, 9), weight, auto_pad=auto_pad, strides=[stride, stride])
    canonical = canonicalize(model)
    attrs = {a.name: a for a in canonical.graph.node[0].attribute}
    if stride == 1 or auto_pad in ("VALID", "NOTSET"):
        assert "auto_pad" not in attrs or attrs["auto_pad"].s == b"NOTSET"
    feed = {"x": rng.standard_normal((1, 3, 10, 9)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(canonical, feed)[0], rtol=1e-6, atol=1e-6)
    layer = only_layer(model)
    expected = run(model, feed)[0].shape
    assert layer.output_shape == expected
    assert layer.macs == math.prod(expected) * 3 * 3 * 4


def test_depthwise_is_skipped_with_reason(rng):
    layer = only_layer(conv_model((1, 8, 6, 6), rng.standard_normal((8, 1, 3, 3)), group=8, pads=[1] * 4))
    assert not layer.candidate and "depthwise" in layer.skip_reason
    assert layer.macs == 8 * 36 * 9


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,with_c", itertools.product(
    [0, 1], [0, 1], [1.0, 0.5], [1.0, 2.0], [False, True]))
def test_gemm_every_attribute_combination(rng, trans_a, trans_b, alpha, beta, with_c):
    m, k, n = 5, 7, 3
    a_shape = (k, m) if trans_a else (m, k)
    b = rng.standard_normal((n, k) if trans_b else (k, n))
    c = rng.standard_normal(n) if with_c else None
    model = gemm_model(a_shape, b, c, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    layer = only_layer(model)
    assert layer.output_shape == (m, n)
    assert layer.macs == m * k * n
    assert layer.params == k * n + (n if with_c else 0)
    assert layer.matrix().shape == (k, n)
    assert layer.gemm.trans_a == bool(trans_a) and layer.gemm.alpha == alpha and layer.gemm.has_c == with_c


@pytest.mark.parametrize("side", ["right", "left"])
def test_matmul_constant_on_either_side(rng, side):
    if side == "right":
        model, expected = matmul_model((2, 3, 5, 6), rng.standard_normal((6, 4))), 2 * 3 * 5 * 6 * 4
    else:
        model, expected = matmul_model((2, 6, 5), rng.standard_normal((4, 6)), side="left"), 2 * 4 * 6 * 5
    layer = only_layer(model)
    assert layer.weight_side == side and layer.macs == expected and layer.candidate


def test_constant_node_weights_become_initializers(rng):
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weight)),
             helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    layer = only_layer(model)
    assert layer.candidate and layer.weight_name == "W" and layer.name == "Conv_1"
    np.testing.assert_array_equal(layer.weight, weight)


def test_weights_and_biases_behind_identity_nodes_are_constants(rng, tmp_path):
    # torch.onnx shares equal initializers through Identity nodes (here: a bias, twice removed).
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    nodes = [helper.make_node("Identity", ["b"], ["b_copy"]),
             helper.make_node("Identity", ["b_copy"], ["b_copy2"]),
             helper.make_node("Identity", ["w1"], ["w1_copy"]),
             helper.make_node("Conv", ["x", "w0", "b_copy"], ["h"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w1_copy", "b_copy2"], ["y"], name="conv1", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    workspace = prepared(model)
    assert all(d.reason is None for d in workspace.decisions.values())
    assert workspace.totals_before["params"] == 4 * 3 * 9 + 4 * 4 * 9 + 4     # the shared bias once
    api.compress(model, tmp_path / "out.onnx", Settings(method="tucker2", rank_ratio=1.0, validate=False))
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    assert_numerically_equal(model, onnx.load(str(tmp_path / "out.onnx")), feed)


def test_shared_initializer_is_counted_once(rng):
    weight = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="second")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    workspace = api.inspect(model)
    assert [layer.shared_with for layer in workspace.layers] == [("second",), ("first",)]
    assert workspace.totals == {"macs": 2 * 2 * 4 * 4, "params": 16}


def test_dynamic_batch_is_pinned(rng):
    model = conv_model((1, 3, 8, 8), rng.standard_normal((4, 3, 3, 3)), dynamic_batch=True)
    assert only_layer(model).output_shape == (1, 4, 6, 6)
    assert only_layer(model, ["x:4x3x8x8"]).output_shape == (4, 4, 6, 6)


def test_layers_in_if_branches_are_candidates_counted_once_per_branch(rng):
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["z"], name="inner")], "then",
                               [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["w"])], "else", [],
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 4])])
    nodes = [helper.make_node("If", ["c"], ["y"], name="branching", then_branch=branch, else_branch=other),
             helper.make_node("MatMul", ["x", "W"], ["v"], name="outer")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                               helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("v", TensorProto.FLOAT, None)], [weight])
    found = api.inspect(model)
    layers = {layer.name: layer for layer in found.layers}
    assert layers["inner"].subgraph == "branching/then_branch"
    assert layers["inner"].candidate and layers["outer"].candidate
    assert layers["inner"].macs == 2 * 4 * 3 and layers["inner"].runs == 1
    assert "then_branch of If 'branching'" in layers["inner"].scope
    # No --input-value decides the branch: the costlier one (the then_branch, the only one with a layer) counts.
    assert found.totals["macs"] == 2 * (2 * 4 * 3)
    assert "costlier branch" in found.counting


def test_quantized_and_runtime_weights_are_skipped(rng):
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    qweight = numpy_helper.from_array(rng.integers(-5, 5, (4, 3, 1, 1)).astype(np.int8), "qW")
    nodes = [helper.make_node("DequantizeLinear", ["qW", "s"], ["W"], name="dq"),
             helper.make_node("Conv", ["x", "W"], ["y"], name="qdq_conv"),
             helper.make_node("MatMul", ["a", "b"], ["z"], name="attention")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
                               helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 2])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [scale, qweight])
    layers = {layer.name: layer for layer in api.inspect(model).layers}
    assert "QDQ" in layers["qdq_conv"].skip_reason
    assert "run time" in layers["attention"].skip_reason and layers["attention"].macs == 2 * 3 * 2


def test_model_without_layers_is_bad_input():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(InputError, match="no Conv"):
        api.inspect(model)


def test_bundled_digits_model_totals():
    workspace = api.inspect("models/digits_cnn.onnx")
    expected_macs = 8 * 8 * 32 * 9 + 8 * 8 * 64 * 32 * 9 + 2 * 4 * 4 * 64 * 64 * 9 + 256 * 64 + 64 * 10
    assert workspace.totals == {"macs": expected_macs, "params": 109_770}


def test_shape_inference_reads_a_copy_without_the_weights():
    from onnx_lowrank.shapes import INFERENCE_WEIGHT_BYTES, infer_shapes, without_weights

    weight = numpy_helper.from_array(np.ones((64, 32), np.float32), "w")              # 8 KiB: left out
    shape = numpy_helper.from_array(np.array([-1, 4, 8], np.int64), "shape")         # kept: a value inference reads
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "shape"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, shape])
    light = without_weights(model)
    assert [t.name for t in light.graph.initializer] == ["shape"] and "w" in {i.name for i in light.graph.input}
    assert light.ByteSize() < INFERENCE_WEIGHT_BYTES < weight.ByteSize()
    assert infer_shapes(model)["y"] == (3, 4, 8) and infer_shapes(model)["h"] == (3, 32)
    assert len(model.graph.initializer) == 2                                          # the model is untouched


def test_shapes_inference_cannot_resolve_are_read_off_a_run_of_the_model_with_its_weights():
    from onnx_lowrank.shapes import infer_shapes

    weight = numpy_helper.from_array(np.ones((64, 32), np.float32), "w")              # over INFERENCE_WEIGHT_BYTES
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("NonZero", ["h"], ["nz"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                       [helper.make_tensor_value_info("nz", TensorProto.INT64, None)], [weight])
    assert infer_shapes(model, need={"nz"})["nz"] == (2, 3 * 32)    # random x: every product is nonzero


def test_layers_read_their_weights_from_the_model_through_a_bounded_cache(rng):
    """A found layer holds no copy of its weight: it reads the initializer (read-only), and the
    cache keeps the arrays read last within its byte budget."""
    from onnx_lowrank.weights import WeightCache

    weight = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    (layer,) = prepared(conv_model((1, 4, 8, 8), weight)).layers
    assert "_weight" not in vars(layer) and layer.weight_tensor is not None
    np.testing.assert_array_equal(layer.weight, weight)
    assert not layer.weight.flags.writeable
    tensors = [numpy_helper.from_array(rng.standard_normal(256).astype(np.float32), f"t{i}") for i in range(4)]
    cache = WeightCache(budget=2 * 1024)                 # two of the 1 KiB tensors
    first = cache.get(tensors[0])
    assert cache.get(tensors[0]) is first                # cached
    for tensor in tensors[1:]:
        np.testing.assert_array_equal(cache.get(tensor), numpy_helper.to_array(tensor))
    assert cache.get(tensors[0]) is not first            # dropped past the budget, read again
    np.testing.assert_array_equal(cache.get(tensors[0]), first)
    given = dataclasses.replace(layer, weight=None)      # a weight given directly is held as given
    assert given.weight is None
