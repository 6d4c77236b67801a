"""Exact folds of element-wise nodes (onnx_lowrank.fold), checked in onnxruntime."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_numerically_equal, make_model
from onnx_lowrank.fold import fold_elementwise

C_IN, C_OUT = 6, 8


def _value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape) if shape is not None else None)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def _conv(name, x, y, weight_name, bias_name=None, **attrs):
    return helper.make_node("Conv", [x, weight_name] + ([bias_name] if bias_name else []), [y], name=name, **attrs)


def _elementwise(op, x, constant_name, y, constant_first=False):
    inputs = [constant_name, x] if constant_first else [x, constant_name]
    return helper.make_node(op, inputs, [y], name=f"{op}_{y}")


def _feed(rng, shape):
    return {"x": rng.standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("op, constant_first", [("Mul", False), ("Mul", True), ("Add", True), ("Sub", False),
                                                ("Sub", True), ("Div", False)])
@pytest.mark.parametrize("constant_shape", ["scalar", "channel", "full"])
def test_affine_after_conv_folds_into_it(rng, dims, op, constant_first, constant_shape):
    kernel = (3,) * dims
    shape = {"scalar": (), "channel": (C_OUT,) + (1,) * dims, "full": (1, C_OUT) + (1,) * dims}[constant_shape]
    constant = rng.uniform(0.5, 2.0, shape)
    inits = [_const("W", rng.standard_normal((C_OUT, C_IN // 2, *kernel))), _const("B", rng.standard_normal(C_OUT)),
             _const("c", constant)]
    nodes = [_conv("conv", "x", "t", "W", "B", group=2, strides=[2] * dims, pads=[1, 0] * dims),
             _elementwise(op, "t", "c", "y", constant_first)]
    x_shape = (2, C_IN, *(9,) * dims)
    model = make_model(nodes, [_value("x", x_shape)], [_value("y", None)], inits)
    folded, counts = fold_elementwise(model)
    assert counts.output_affine == 1 and _ops(folded) == {"Conv": 1}
    assert folded.graph.output[0].name == "y"
    assert_numerically_equal(model, folded, _feed(rng, x_shape))


@pytest.mark.parametrize("reason", ["last_axis", "two_readers", "graph_output", "constant_over_x", "runtime_other"])
def test_affine_after_conv_stays_where_folding_would_change_the_model(rng, reason):
    x_shape = (1, C_IN, 8, 8)
    constant = rng.uniform(0.5, 2.0, (8,) if reason == "last_axis" else (1, C_OUT, 1, 1))
    inits = [_const("W", rng.standard_normal((C_OUT, C_IN, 3, 3))), _const("c", constant)]
    inputs, outputs = [_value("x", x_shape)], [_value("y", None)]
    nodes = [_conv("conv", "x", "t", "W", pads=[1, 1, 1, 1])]
    if reason == "constant_over_x":
        nodes.append(_elementwise("Div", "t", "c", "y", constant_first=True))
    elif reason == "runtime_other":
        inputs.append(_value("s", (1, C_OUT, 1, 1)))
        nodes.append(_elementwise("Mul", "t", "s", "y"))
    else:
        nodes.append(_elementwise("Mul", "t", "c", "y"))
    if reason == "two_readers":
        nodes.append(helper.make_node("Relu", ["t"], ["r"], name="relu"))
        outputs.append(_value("r", None))
    if reason == "graph_output":
        outputs.append(_value("t", None))
    model = make_model(nodes, inputs, outputs, inits)
    folded, counts = fold_elementwise(model)
    assert counts.total == 0 and folded is model


@pytest.mark.parametrize("pads", [[0, 0, 0, 0], [1, 0, 2, 1]])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_affine_before_convs_folds_its_scale_always_and_its_shift_only_without_padding(rng, pads, groups):
    x_shape = (2, C_IN, 9, 7)
    scale = rng.uniform(0.5, 2.0, (1, C_IN, 1, 1))
    shift = rng.standard_normal((1, C_IN, 1, 1))
    inits = [_const("s", scale), _const("b", shift),
             _const("W1", rng.standard_normal((C_OUT * groups // 2 * 2, C_IN // groups, 3, 3))),
             _const("B1", rng.standard_normal(C_OUT * groups // 2 * 2)),
             _const("W2", rng.standard_normal((4, C_IN, 1, 1)))]
    nodes = [_elementwise("Mul", "x", "s", "scaled"), _elementwise("Add", "scaled", "b", "shifted"),
             _conv("conv1", "shifted", "y1", "W1", "B1", group=groups, pads=pads, strides=[1, 2], dilations=[2, 1]),
             _conv("conv2", "shifted", "y2", "W2")]
    model = make_model(nodes, [_value("x", x_shape)], [_value("y1", None), _value("y2", None)], inits)
    folded, counts = fold_elementwise(model)
    padded = any(pads)
    assert counts.input_affine == (1 if padded else 2)  # padded: the scale moves past the shift, folds
    assert _ops(folded) == ({"Add": 1, "Conv": 2} if padded else {"Conv": 2})
    assert_numerically_equal(model, folded, _feed(rng, x_shape))


def test_a_scale_alone_folds_into_a_padded_conv(rng):
    x_shape = (1, C_IN, 8, 8)
    inits = [_const("s", rng.uniform(0.5, 2.0, (C_IN, 1, 1))), _const("W", rng.standard_normal((C_OUT, C_IN, 3, 3)))]
    nodes = [_elementwise("Mul", "x", "s", "scaled"), _conv("conv", "scaled", "y", "W", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [_value("x", x_shape)], [_value("y", None)], inits)
    folded, counts = fold_elementwise(model)
    assert counts.input_affine == 1 and _ops(folded) == {"Conv": 1}
    assert_numerically_equal(model, folded, _feed(rng, x_shape))


def test_affine_before_a_conv_and_something_else_stays(rng):
    x_shape = (1, C_IN, 8, 8)
    inits = [_const("s", rng.uniform(0.5, 2.0, (1, C_IN, 1, 1))), _const("W", rng.standard_normal((C_OUT, C_IN, 1, 1)))]
    nodes = [_elementwise("Mul", "x", "s", "scaled"), _conv("conv", "scaled", "y", "W"),
             helper.make_node("Relu", ["scaled"], ["r"], name="relu")]
    model = make_model(nodes, [_value("x", x_shape)], [_value("y", None), _value("r", None)], inits)
    assert fold_elementwise(model)[1].total == 0


@settings(max_examples=25, deadline=None)
@given(dims=st.integers(1, 3), groups=st.sampled_from([1, 2]), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       pad=st.integers(0, 2), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_folding_both_sides_of_a_conv_is_exact(dims, groups, stride, dilation, pad, bias, seed):
    """Scale in, scale and shift out, across conv variants: the folded model equals the original."""
    rng = np.random.default_rng(seed)
    x_shape = (1, 4, *(7,) * dims)
    weight = rng.standard_normal((6, 4 // groups, *(2,) * dims))
    inits = [_const("s_in", rng.uniform(0.5, 2.0, (4,) + (1,) * dims)), _const("W", weight),
             _const("s_out", rng.uniform(0.5, 2.0, (1, 6) + (1,) * dims)),
             _const("t_out", rng.standard_normal((6,) + (1,) * dims))]
    if bias:
        inits.append(_const("B", rng.standard_normal(6)))
    nodes = [_elementwise("Mul", "x", "s_in", "scaled"),
             _conv("conv", "scaled", "t", "W", "B" if bias else None, group=groups, strides=[stride] * dims,
                   dilations=[dilation] * dims, pads=[pad] * (2 * dims)),
             _elementwise("Mul", "t", "s_out", "u"), _elementwise("Add", "u", "t_out", "y")]
    model = make_model(nodes, [_value("x", x_shape)], [_value("y", None)], inits)
    folded, counts = fold_elementwise(model)
    assert (counts.input_affine, counts.output_affine) == (1, 2) and _ops(folded) == {"Conv": 1}
    assert_numerically_equal(model, folded, _feed(rng, x_shape))


def _hard_swish_model(order, sixth, opset, three=3.0):
    """x·clip(x + 3, 0, 6)/6 as exporters spell it: `order` multiply-first or divide-first."""
    inits = [_const("three", three), _const("zero", 0.0), _const("six", 6.0), _const("sixth", 1 / 6)]
    scale = (helper.make_node("Div", [order == "multiply" and "m" or "r", "six"], ["d"], name="div") if sixth == "div"
             else helper.make_node("Mul", [order == "multiply" and "m" or "r", "sixth"], ["d"], name="mul6"))
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Add", ["a", "three"], ["p"], name="add"),
             helper.make_node("Clip", ["p", "zero", "six"], ["r"], name="clip")]
    if order == "multiply":
        nodes += [helper.make_node("Mul", ["r", "a"], ["m"], name="mul"), scale]
        nodes[-1].output[0] = "y"
    else:
        nodes += [scale, helper.make_node("Mul", ["a", "d"], ["y"], name="mul")]
    return make_model(nodes, [_value("x", (2, 3, 5, 5))], [_value("y", None)], inits, opset=opset)


@pytest.mark.parametrize("order", ["multiply", "divide"])
@pytest.mark.parametrize("sixth", ["div", "mul"])
@pytest.mark.parametrize("opset", [11, 13, 14, 17])
def test_hard_swish_chains_become_one_or_two_nodes(rng, order, sixth, opset):
    model = _hard_swish_model(order, sixth, opset)
    folded, counts = fold_elementwise(model)
    assert counts.hard_swish == 1
    expected = {"Relu": 1, "HardSwish": 1} if opset >= 14 else {"Relu": 1, "HardSigmoid": 1, "Mul": 1}
    assert _ops(folded) == expected
    assert [o.version for o in folded.opset_import] == [opset]
    onnx.checker.check_model(folded, full_check=True)
    feed = {"x": rng.uniform(-8, 8, (2, 3, 5, 5)).astype(np.float32)}
    assert_numerically_equal(model, folded, feed)


def test_a_near_hard_swish_is_left_alone():
    model = _hard_swish_model("multiply", "div", 17, three=2.0)
    assert fold_elementwise(model)[1].total == 0


def test_the_input_model_is_not_modified(rng):
    inits = [_const("W", rng.standard_normal((C_OUT, C_IN, 1, 1))), _const("c", rng.uniform(1, 2, (1, C_OUT, 1, 1)))]
    model = make_model([_conv("conv", "x", "t", "W"), _elementwise("Mul", "t", "c", "y")],
                       [_value("x", (1, C_IN, 4, 4))], [_value("y", None)], inits)
    before = model.SerializeToString()
    folded, counts = fold_elementwise(model)
    assert counts.total == 1 and model.SerializeToString() == before
    assert {t.name for t in folded.graph.initializer} == {"conv/folded_weight", "conv/folded_bias"}


def test_compress_folds_by_default_and_keeps_with_no_fold(rng, tmp_path):
    from onnx_lowrank.api import compress
    from onnx_lowrank.config import Settings
    from onnx_lowrank.report import compression_report, validate_report

    inits = [_const("W", rng.standard_normal((32, 32, 3, 3))), _const("c", rng.uniform(1, 2, (1, 32, 1, 1)))]
    model = make_model([_conv("conv", "x", "t", "W", pads=[1, 1, 1, 1]), _elementwise("Mul", "t", "c", "y")],
                       [_value("x", (1, 32, 8, 8))], [_value("y", None)], inits)
    for fold, ops in ((True, {"Conv"}), (False, {"Conv", "Mul"})):
        workspace = compress(model, tmp_path / f"{fold}.onnx", Settings(rank_ratio=0.5, fold=fold, latency=False))
        saved = onnx.load(tmp_path / f"{fold}.onnx")
        assert {n.op_type for n in saved.graph.node} == ops
        report = compression_report(workspace, "in.onnx", "out.onnx")
        validate_report(report)
        assert report["folded"]["output_affine"] == int(fold)
        assert report["validation"]["outputs"][0]["cosine"] > 0.5


def test_folded_weights_carry_no_subnormals(rng):
    weight = rng.standard_normal((C_OUT, C_IN, 1, 1))
    weight[0] = 1e-30  # times 1e-10 below: subnormal in float32
    inits = [_const("W", weight), _const("c", 1e-10)]
    model = make_model([_conv("conv", "x", "t", "W"), _elementwise("Mul", "t", "c", "y")],
                       [_value("x", (1, C_IN, 4, 4))], [_value("y", None)], inits)
    folded = numpy_helper.to_array(next(t for t in fold_elementwise(model)[0].graph.initializer
                                        if t.name == "conv/folded_weight"))
    assert np.all(folded[0] == 0) and np.all(folded[1:] != 0)


def test_an_affine_that_broadcasts_its_input_to_more_channels_stays(rng):
    """x has 1 channel, the Mul's constant 4: the conv after it reads 4 channels, x cannot replace it."""
    inits = [_const("s", rng.uniform(0.5, 2.0, (1, 4, 1, 1))), _const("W", rng.standard_normal((C_OUT, 4, 1, 1)))]
    nodes = [_elementwise("Mul", "x", "s", "scaled"), _conv("conv", "scaled", "y", "W")]
    model = make_model(nodes, [_value("x", (1, 1, 5, 5))], [_value("y", None)], inits)
    assert fold_elementwise(model)[1].total == 0


def test_cli_says_what_it_folded_and_no_fold_keeps_the_nodes(rng, tmp_path, capsys):
    from onnx_lowrank import cli

    inits = [_const("W", rng.standard_normal((32, 32, 3, 3))), _const("c", rng.uniform(1, 2, (1, 32, 1, 1)))]
    model = make_model([_conv("conv", "x", "t", "W", pads=[1, 1, 1, 1]), _elementwise("Mul", "t", "c", "y")],
                       [_value("x", (1, 32, 8, 8))], [_value("y", None)], inits)
    onnx.save(model, tmp_path / "in.onnx")
    assert cli.main(["compress", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "a.onnx"), "--no-latency"]) == 0
    assert "folded exactly: 1 + 0 per-channel affine nodes" in capsys.readouterr().out
    assert cli.main(["compress", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "b.onnx"), "--no-latency",
                     "--no-fold"]) == 0
    assert "folded exactly" not in capsys.readouterr().out
    assert "Mul" in {n.op_type for n in onnx.load(tmp_path / "b.onnx").graph.node}


@pytest.mark.parametrize("zero_in_scale", [False, True])
def test_a_scale_before_a_shift_before_padded_convs_folds_past_the_shift(rng, zero_in_scale):
    """Mul(s) -> Add(t) -> padded Conv becomes Add(t/s) -> Conv(W·s); a zero in s stops it."""
    x_shape = (1, C_IN, 8, 8)
    scale = rng.uniform(0.5, 2.0, (1, C_IN, 1, 1))
    if zero_in_scale:
        scale[0, 2] = 0.0
    inits = [_const("s", scale), _const("t", rng.standard_normal((1, C_IN, 1, 1))),
             _const("W", rng.standard_normal((C_OUT, C_IN // 2, 3, 3))), _const("B", rng.standard_normal(C_OUT))]
    nodes = [_elementwise("Mul", "x", "s", "scaled"), _elementwise("Add", "scaled", "t", "shifted"),
             _conv("conv", "shifted", "y", "W", "B", group=2, pads=[1, 1, 1, 1])]
    model = make_model(nodes, [_value("x", x_shape)], [_value("y", None)], inits)
    folded, counts = fold_elementwise(model)
    if zero_in_scale:
        assert counts.total == 0
        return
    assert counts.input_affine == 1 and _ops(folded) == {"Add": 1, "Conv": 1}
    assert_numerically_equal(model, folded, _feed(rng, x_shape))


def _hard_swish_chain(x, y, three_name, prefix=""):
    return [helper.make_node("Add", [x, three_name], [f"{prefix}p"], name=""),
            helper.make_node("Clip", [f"{prefix}p", "zero", "six"], [f"{prefix}r"], name=""),
            helper.make_node("Mul", [x, f"{prefix}r"], [f"{prefix}m"], name=""),
            helper.make_node("Div", [f"{prefix}m", "six"], [y], name="")]


@pytest.mark.parametrize("case", ["three_adds_axes", "int32", "float64"])
def test_hard_swish_chains_that_would_change_the_model_stay(case):
    """A constant of more axes than x broadcasts x up; int and float64 have no HardSwish kernel."""
    dtype = {"int32": np.int32, "float64": np.float64}.get(case, np.float32)
    elem = {"int32": TensorProto.INT32, "float64": TensorProto.DOUBLE}.get(case, TensorProto.FLOAT)
    three = np.full((1, 1, 1) if case == "three_adds_axes" else (), 3, dtype)
    inits = [numpy_helper.from_array(three, "three"), numpy_helper.from_array(np.asarray(0, dtype), "zero"),
             numpy_helper.from_array(np.asarray(6, dtype), "six")]
    model = make_model(_hard_swish_chain("x", "y", "three"), [helper.make_tensor_value_info("x", elem, [2, 3])],
                       [helper.make_tensor_value_info("y", elem, None)], inits)
    assert fold_elementwise(model)[1].total == 0


@pytest.mark.parametrize("opset", [13, 17])
def test_unnamed_hard_swish_chains_get_unique_names(rng, opset):
    inits = [_const("three", 3.0), _const("zero", 0.0), _const("six", 6.0)]
    nodes = _hard_swish_chain("x", "h", "three", "a") + _hard_swish_chain("h", "y", "three", "b")
    model = make_model(nodes, [_value("x", (2, 3))], [_value("y", None)], inits, opset=opset)
    folded, counts = fold_elementwise(model)
    assert counts.hard_swish == 2
    onnx.checker.check_model(folded, full_check=True)
    assert_numerically_equal(model, folded, {"x": rng.uniform(-8, 8, (2, 3)).astype(np.float32)})


def test_a_scale_too_small_to_move_past_its_shift_stays(rng):
    x_shape = (1, C_IN, 6, 6)
    scale = rng.uniform(0.5, 2.0, (1, C_IN, 1, 1))
    scale[0, 1] = 1e-30
    inits = [_const("s", scale), _const("t", rng.standard_normal((1, C_IN, 1, 1))),
             _const("W", rng.standard_normal((C_OUT, C_IN, 3, 3)))]
    nodes = [_elementwise("Mul", "x", "s", "scaled"), _elementwise("Add", "scaled", "t", "shifted"),
             _conv("conv", "shifted", "y", "W", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [_value("x", x_shape)], [_value("y", None)], inits)
    assert fold_elementwise(model)[1].total == 0


@pytest.mark.parametrize("case", ["custom_domain", "initializer_as_input", "sparse_initializer"])
def test_models_the_rebuild_would_not_keep_are_left_alone(rng, case):
    inits = [_const("W", rng.standard_normal((C_OUT, C_IN, 1, 1))), _const("c", rng.uniform(1, 2, (1, C_OUT, 1, 1)))]
    nodes = [_conv("conv", "x", "t", "W"), _elementwise("Mul", "t", "c", "y")]
    inputs, outputs = [_value("x", (1, C_IN, 4, 4))], [_value("y", None)]
    if case == "custom_domain":
        nodes[1].domain = "com.example"
        graph = helper.make_graph(nodes, "test", inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.example", 1)])
    else:
        model = make_model(nodes, inputs, outputs, inits)
    if case == "initializer_as_input":
        model.graph.input.append(_value("c", (1, C_OUT, 1, 1)))
    else:
        values = numpy_helper.from_array(np.asarray([1.0], np.float32), "values")
        indices = numpy_helper.from_array(np.asarray([0], np.int64), "indices")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    folded, counts = fold_elementwise(model)
    assert counts.total == 0 and folded is model


def test_float16_hard_swish_with_a_rounded_sixth_fuses(rng):
    inits = [numpy_helper.from_array(np.asarray(v, np.float16), n)
             for n, v in (("three", 3), ("zero", 0), ("six", 6), ("sixth", 1 / 6))]
    nodes = _hard_swish_chain("x", "y", "three")
    nodes[-1] = helper.make_node("Mul", ["m", "sixth"], ["y"], name="")
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], inits)
    assert fold_elementwise(model)[1].hard_swish == 1
