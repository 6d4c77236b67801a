"""Activation-aware fitting: the activations' numerics, finding them in a graph, and the fit."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, prepared
from onnx_lowrank.config import Settings
from onnx_lowrank.factorize.activation import Activation
from onnx_lowrank.factorize.moments import Moments
from onnx_lowrank.fitting import fit_layer
from onnx_lowrank.methods import MethodSet
from onnx_lowrank.nonlinearity import activations_after

CHANNELS = 5


def activation(kind: str, rng) -> Activation:
    """Each kind with a non-trivial per-channel affine map before it."""
    params = {"leaky_relu": (0.1,), "clip": (0.0, 6.0), "hard_sigmoid": (0.2, 0.5), "hard_swish": (1 / 6, 0.5)}
    slope = rng.uniform(0.05, 0.3, CHANNELS) if kind == "prelu" else None
    return Activation(kind, rng.uniform(0.5, 2.0, CHANNELS) * rng.choice([-1, 1], CHANNELS),
                      rng.normal(size=CHANNELS), params.get(kind, ()), slope)


KINDS = ("relu", "leaky_relu", "prelu", "clip", "hard_sigmoid", "sigmoid", "hard_swish", "swish")


@pytest.mark.parametrize("kind", KINDS)
def test_derivative_matches_finite_differences(kind, rng):
    f = activation(kind, rng)
    y = rng.normal(scale=4.0, size=(400, CHANNELS))
    step = 1e-6
    numeric = (f(y + step) - f(y - step)) / (2 * step)
    kinks = np.abs(numeric - f.derivative(y)) > 1e-5
    assert kinks.mean() < 0.01          # only where a kink lies within the step
    assert np.allclose(f.derivative(y)[~kinks], numeric[~kinks], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lam", [0.05, 1.0, 20.0])
def test_auxiliary_step_finds_the_scalar_minimum(kind, lam, rng):
    """Against a fine grid search of ``(F(y) - z)² + λ (y - v)²`` per element."""
    f = activation(kind, rng)
    count = 40
    z = f(rng.normal(scale=3.0, size=(count, CHANNELS))) + rng.normal(scale=0.3, size=(count, CHANNELS))
    v = rng.normal(scale=3.0, size=(count, CHANNELS))
    y = f.auxiliary(z, v, lam)
    grid = np.linspace(-15, 15, 30001)[:, None, None]
    costs = (f(grid) - z) ** 2 + lam * (grid - v) ** 2
    found = (f(y) - z) ** 2 + lam * (y - v) ** 2
    assert np.all(found <= costs.min(axis=0) + 1e-6 * (1 + costs.min(axis=0)))


def test_relu_auxiliary_step_is_zhangs_closed_form(rng):
    f = Activation("relu", np.ones(CHANNELS), np.zeros(CHANNELS))
    z = np.maximum(rng.normal(size=(50, CHANNELS)), 0)
    v = rng.normal(size=(50, CHANNELS))
    lam = 0.5
    negative, positive = np.minimum(v, 0), np.maximum(0, (z + lam * v) / (1 + lam))
    cost = lambda y: (np.maximum(y, 0) - z) ** 2 + lam * (y - v) ** 2   # noqa: E731
    expected = np.where(cost(negative) <= cost(positive), negative, positive)
    assert np.allclose(f.auxiliary(z, v, lam), expected, atol=1e-9)


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def test_activations_found_through_affine_nodes_and_gates(rng):
    """Conv -> BN -> Relu; Conv -> Mul(per channel) -> x·HardSigmoid(x); MatMul -> Add -> Clip;
    a Conv read by two unrelated nodes has none."""
    c = 4
    w = rng.normal(size=(c, c, 1, 1))
    gamma, beta, mean, var = rng.uniform(0.5, 2, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(0.5, 2, c)
    scale = rng.uniform(0.5, 2, c)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
        helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["an"], epsilon=1e-3),
        helper.make_node("Relu", ["an"], ["ar"]),
        helper.make_node("Conv", ["ar", "w2"], ["c2"], name="conv2"),
        helper.make_node("Mul", ["c2", "s"], ["c2s"]),
        helper.make_node("HardSigmoid", ["c2s"], ["gate"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["c2s", "gate"], ["hs"]),
        helper.make_node("Conv", ["hs", "w3"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Sigmoid", ["c3"], ["s3"]),
        helper.make_node("Add", ["r3", "s3"], ["sum"]),
        helper.make_node("Flatten", ["sum"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w4"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "bias"], ["mb"]),
        helper.make_node("Clip", ["mb", "lo", "hi"], ["out"]),
    ]
    inits = [_init("w1", w), _init("w2", w), _init("w3", w), _init("g", gamma), _init("b", beta), _init("m", mean),
             _init("v", var), _init("s", scale.reshape(c, 1, 1)), _init("w4", rng.normal(size=(c * 9, 6))),
             _init("bias", np.arange(6.0)), _init("lo", 0.0), _init("hi", 6.0)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 3, 3])],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    workspace = prepared(model)
    found = activations_after(workspace.canonical, workspace.layers)
    assert sorted(found) == ["conv1", "conv2", "matmul"]
    bn = gamma / np.sqrt(var + 1e-3)
    assert found["conv1"].kind == "relu"
    assert np.allclose(found["conv1"].scale, bn) and np.allclose(found["conv1"].shift, beta - bn * mean)
    assert found["conv2"].kind == "hard_swish" and np.allclose(found["conv2"].params, (1 / 6, 0.5))
    assert np.allclose(found["conv2"].scale, scale) and np.allclose(found["conv2"].shift, 0)
    assert found["matmul"].kind == "clip" and found["matmul"].params == (0.0, 6.0)
    assert np.allclose(found["matmul"].shift, np.arange(6.0))


def relu_layer_exactly_low_rank_after_activation(rng, rank=8, live=24, dead=40, dim=32):
    """A Gemm + ReLU whose response is that of a rank-`rank` map: `live` outputs come from a
    rank-`rank` map, `dead` ones are full-rank rows with a bias so negative that the ReLU silences
    them on every input. Their pre-activation variance is the larger, so a fit of the linear
    output spends the rank on them."""
    low = rng.normal(size=(live, rank)) @ rng.normal(size=(rank, dim)) / np.sqrt(dim * rank)
    weight = np.vstack([low, rng.normal(size=(dead, dim))]).astype(np.float32)
    bias = np.concatenate([np.zeros(live), np.full(dead, -40.0)]).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1),
                        helper.make_node("Relu", ["y"], ["r"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim])],
                       [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
                       [_init("w", weight), _init("b", bias)])
    workspace = prepared(model)
    return workspace.layers[0], activations_after(workspace.canonical, workspace.layers)["gemm"]


def _response_error(layer, chain, x, activation):
    reference = activation(x @ layer.weight.T.astype(np.float64) + layer.bias)
    from onnx_lowrank.fitting import chain_kernel

    fitted = activation(x @ chain_kernel(layer, chain).T + chain.bias)
    return np.linalg.norm(fitted - reference) / np.linalg.norm(reference - reference.mean(axis=0))


def test_activation_aware_fit_recovers_a_layer_low_rank_after_its_relu(rng):
    layer, relu = relu_layer_exactly_low_rank_after_activation(rng)
    method = MethodSet(Settings(method="svd")).serving("svd", layer)
    calib, held_out = rng.normal(size=(4000, 32)), rng.normal(size=(2000, 32))
    moments = Moments()
    moments.add(calib)
    linear = fit_layer(layer, method, (8,), stats=moments)
    samples = (calib[None].astype(np.float32),) * 2
    aware = fit_layer(layer, method, (8,), stats=moments, activation=relu, samples=samples)
    assert _response_error(layer, linear.chain, held_out, relu) > 0.9
    assert _response_error(layer, aware.chain, held_out, relu) < 0.25
