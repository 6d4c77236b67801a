"""Block-wise reconstruction: numpy gradients, the optimiser's guarantees, boundaries, the pass."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, prepared, run
from onnx_lowrank.passes.refine import block_ranges, single_tensor_cuts
from onnx_lowrank.refine.block import Block
from onnx_lowrank.refine.optimize import RefineOptions, refine_block


def _init(name, value, dtype=np.float64):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


CASES = [
    ("Conv", [(2, 4, 7, 6), (6, 2, 3, 3), (6,)], {"group": 2, "pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ("Conv", [(2, 3, 8, 8), (5, 3, 3, 2)], {"dilations": [2, 1], "pads": [1, 1, 1, 1]}),
    ("Conv", [(1, 4, 5, 5), (4, 1, 3, 3)], {"group": 4, "pads": [1, 1, 1, 1]}),
    ("MatMul", [(2, 3, 5), (5, 4)], {}),
    ("Gemm", [(3, 5), (4, 5), (4,)], {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    ("Gemm", [(5, 3), (5, 4)], {"transA": 1}),
    ("Add", [(2, 3, 4, 4), (3, 1, 1)], {}),
    ("Sub", [(2, 3), (2, 3)], {}),
    ("Mul", [(2, 3, 4, 4), (1, 3, 1, 1)], {}),
    ("Div", [(2, 3), (3,)], {}),
    ("Relu", [(3, 4, 5)], {}),
    ("LeakyRelu", [(3, 4, 5)], {"alpha": 0.1}),
    ("HardSigmoid", [(3, 4, 5)], {"alpha": 0.2, "beta": 0.5}),
    ("HardSwish", [(3, 4, 5)], {}),
    ("Sigmoid", [(3, 4, 5)], {}),
    ("BatchNormalization", [(2, 3, 4, 4), (3,), (3,), (3,), (3,)], {}),
    ("GlobalAveragePool", [(2, 3, 4, 5)], {}),
    ("MaxPool", [(2, 3, 6, 6)], {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("Flatten", [(2, 3, 4)], {"axis": 1}),
    ("Transpose", [(2, 3, 4)], {"perm": [1, 2, 0]}),
    ("Concat", [(2, 3), (2, 4)], {"axis": 1}),
]


@pytest.mark.parametrize("op, shapes, attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_gradients_match_finite_differences(op, shapes, attrs, rng):
    """d/dx of ``Σ g · y`` for a random g, against central differences, for every float input."""
    values = [rng.normal(size=shape) for shape in shapes]
    if op == "BatchNormalization":
        values[4] = np.abs(values[4]) + 0.5              # a variance
    if op == "Div":
        values[1] = np.sign(values[1]) * (np.abs(values[1]) + 0.5)
    names = [f"x{i}" for i in range(len(shapes))]
    block = Block([(op, names, ["y"], attrs)], {}, names, ["y"])
    feeds = dict(zip(names, values))
    tape = []
    y = block.forward(feeds, tape=tape)["y"]
    upstream = rng.normal(size=y.shape)
    trainable = names[1:] if op == "BatchNormalization" else names
    block_grads = _input_gradients(block, feeds, upstream, trainable)
    step = 1e-6
    for name in trainable if op != "BatchNormalization" else names[:1]:
        numeric = np.zeros_like(feeds[name])
        for index in np.ndindex(*feeds[name].shape):
            for sign in (1, -1):
                shifted = dict(feeds)
                shifted[name] = feeds[name].copy()
                shifted[name][index] += sign * step
                numeric[index] += sign * np.sum(upstream * block.forward(shifted)["y"]) / (2 * step)
        assert np.allclose(block_grads[name], numeric, rtol=1e-4, atol=1e-6), name


def _input_gradients(block, feeds, upstream, names):
    """Gradients with respect to inputs: the inputs passed as trainable constants."""
    as_constants = Block(block.nodes, {**block.constants, **feeds}, [], block.outputs)
    tape = []
    as_constants.forward({}, tape=tape)
    every = [name for name in feeds]
    return as_constants.backward(tape, {"y": upstream}, every)


def _two_conv_block(rng, channels=6, rank=2):
    """x -> Conv 3x3 (rank-limited chain: 1x1 then 3x3) -> Relu -> Conv 1x1, as a Block, with
    trainable chain factors, and the original dense block's outputs as targets."""
    w1 = rng.normal(size=(channels, channels, 3, 3)) / 5
    w2 = rng.normal(size=(channels, channels, 1, 1)) / 3
    first = rng.normal(size=(rank, channels, 1, 1)) / 2
    core = rng.normal(size=(channels, rank, 3, 3)) / 3
    nodes = [("Conv", ["x", "a"], ["t"], {}), ("Conv", ["t", "b"], ["u"], {"pads": [1, 1, 1, 1]}),
             ("Relu", ["u"], ["r"], {}), ("Conv", ["r", "c"], ["y"], {})]
    block = Block(nodes, {"c": w2.astype(np.float32)}, ["x"], ["y"])
    dense = Block([("Conv", ["x", "w"], ["u"], {"pads": [1, 1, 1, 1]}), ("Relu", ["u"], ["r"], {}),
                   ("Conv", ["r", "c"], ["y"], {})], {"w": w1.astype(np.float32), "c": w2.astype(np.float32)},
                  ["x"], ["y"])
    x = rng.normal(size=(32, channels, 6, 6)).astype(np.float32)
    params = {"a": first.astype(np.float32), "b": core.astype(np.float32)}
    return block, params, {"x": x}, dense.forward({"x": x})


def test_refinement_lowers_the_held_out_error_and_is_deterministic(rng):
    block, params, inputs, targets = _two_conv_block(rng)
    options = RefineOptions(steps=100, batch=4, learning_rate=2e-2)
    result = refine_block(block, params, inputs, {"y": targets["y"]}, options)
    assert result.held_out_after < 0.7 * result.held_out_before
    again = refine_block(block, params, inputs, {"y": targets["y"]}, options)
    assert all(np.array_equal(result.params[k], again.params[k]) for k in params)
    assert again.held_out_after == result.held_out_after


def test_refinement_never_reports_a_higher_held_out_error(rng):
    """A step size that makes things worse: the closed form is kept, and its error reported."""
    block, params, inputs, targets = _two_conv_block(rng)
    result = refine_block(block, params, inputs, {"y": targets["y"]},
                          RefineOptions(steps=30, batch=4, learning_rate=3.0, eval_every=5, patience=2))
    assert result.held_out_after <= result.held_out_before
    if not result.improved:
        assert all(np.array_equal(result.params[k], params[k]) for k in params)


def test_single_tensor_cuts_and_blocks():
    """x -> A -> B -> Add(x-branch) -> C: no cut inside the residual, cuts around it."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="A"),
             helper.make_node("Relu", ["a"], ["b"], name="B"),
             helper.make_node("Relu", ["b"], ["c"], name="C"),
             helper.make_node("Add", ["a", "c"], ["d"], name="D"),
             helper.make_node("Relu", ["d"], ["y"], name="E")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert single_tensor_cuts(model) == [0, 1, 4, 5]
    assert block_ranges([0, 1, 4, 5], [1, 2, 4], max_layers=3) == [(1, 5)]
    assert block_ranges([0, 1, 2, 3, 4], [0, 1, 2, 3], max_layers=2) == [(0, 2), (2, 4)]
    assert block_ranges([0, 1, 2, 3, 4], [2], max_layers=2) == [(2, 4)]        # with the node after it
    assert block_ranges([0, 1, 2, 3, 4, 5], [1], max_layers=2) == [(1, 3)]


def test_refine_pass_brings_a_compressed_cnn_closer_to_the_original(tmp_path, rng):
    """Two 3x3 convs with ReLUs at rank 2: --refine-blocks lowers the held-out output error."""
    from onnx_lowrank import api
    from onnx_lowrank.config import Settings

    channels = 8
    inits = [_init("w1", rng.normal(size=(channels, 3, 3, 3)) / 3, np.float32),
             _init("w2", rng.normal(size=(channels, channels, 3, 3)) / 8, np.float32),
             _init("w3", rng.normal(size=(channels, channels, 3, 3)) / 8, np.float32)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "w2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Conv", ["br", "w3"], ["y"], name="c3", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.normal(size=(48, 3, 8, 8)).astype(np.float32))
    held = rng.normal(size=(32, 3, 8, 8)).astype(np.float32)
    reference = run(model, {"x": held})[0]
    errors = {}
    for refine in (False, True):
        out = tmp_path / f"refined_{refine}.onnx"
        api.compress(path, out, Settings(method="svd", rank=2, calib=str(calib), batch_size=16, validate=False,
                                         refine_blocks=refine, layers="c2|c3"))
        candidate = run(onnx.load(out), {"x": held})[0]
        errors[refine] = np.linalg.norm(candidate - reference) / np.linalg.norm(reference)
    assert errors[True] < 0.97 * errors[False]
