"""Versatile filters (Wang et al. 2018) fitted after training: the fits and the ONNX rewrites."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import assert_numerically_equal, conv_model, prepared, relative_error, run

from onnx_lowrank.api import inspect
from onnx_lowrank.factorize.versatile import (
    ChannelVersatileFactors,
    SpatialVersatileFactors,
    channel_versatile,
    spatial_versatile,
)
from onnx_lowrank.rewrite.versatile import (
    apply_channel_versatile,
    apply_spatial_versatile,
    channel_versatile_reason,
    spatial_versatile_reason,
    versatile_costs,
)

EXACT_FIT = 1e-6  # float64 means of identical values: rounding only


def nested_masks(d: int) -> np.ndarray:
    s = (d + 1) // 2
    masks = np.zeros((s, d, d))
    for i in range(s):
        masks[i, i : d - i, i : d - i] = 1
    return masks


def spatial_kernel(rng, out_per_group: int, in_per_group: int, d: int, groups: int = 1) -> np.ndarray:
    """Secondaries M_i ∘ f_p: full sets of s levels, a last partial set at levels 1..r, shuffled per group."""
    masks = nested_masks(d)
    s = len(masks)
    full, rest = divmod(out_per_group, s)
    slots = [(p, i) for p in range(full) for i in range(s)] + [(full, i) for i in range(rest)]
    blocks = []
    for _ in range(groups):
        primaries = rng.standard_normal((full + (rest > 0), in_per_group, d, d))
        block = np.stack([primaries[p] * masks[i] for p, i in slots])
        blocks.append(block[rng.permutation(out_per_group)])
    return np.concatenate(blocks)


def channel_kernel(rng, count: int, channels: int, c_hat: int, stride: int, n_primaries: int,
                   kernel=(3, 3)) -> np.ndarray:
    """Filter t is primary p shifted to channel o·g_c, at distinct random outputs (p, o)."""
    n = (channels - c_hat) // stride + 1
    primaries = rng.standard_normal((n_primaries, c_hat, *kernel))
    out = np.zeros((count, channels, *kernel))
    for t, slot in enumerate(rng.permutation(n_primaries * n)[:count]):
        p, o = divmod(int(slot), n)
        out[t, o * stride : o * stride + c_hat] = primaries[p]
    return out


def rewrite(model: onnx.ModelProto, apply, factors, input_shapes=None) -> onnx.ModelProto:
    workspace = prepared(model, input_shapes or ())
    layer = workspace.layers[0]
    graph = gs.import_onnx(workspace.canonical)
    node = next(n for n in graph.nodes if n.name == layer.name)
    apply(graph, node, layer, factors)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = 8
    onnx.checker.check_model(out)
    return out


def feed(rng, shape):
    return {"x": rng.standard_normal(shape).astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# Spatial versatile filters

SPATIAL_CASES = {
    # name: (d, T/g, S/g, groups, attrs, input shape, bias)
    "d3-stride1-bias": (3, 12, 5, 1, {"pads": [1, 1, 1, 1]}, (2, 5, 9, 10), True),
    "d3-stride2-asym": (3, 12, 5, 1, {"strides": [2, 2], "pads": [0, 1, 2, 1]}, (1, 5, 11, 12), False),
    "d3-valid": (3, 8, 4, 1, {}, (1, 4, 7, 8), True),
    "d5-dilation2-partial": (5, 13, 4, 1, {"dilations": [2, 2], "pads": [4, 3, 2, 5]}, (2, 4, 14, 13), True),
    "d5-stride2-dilation2": (5, 9, 3, 1, {"strides": [2, 1], "dilations": [2, 2], "pads": [1, 0, 3, 2]},
                             (1, 3, 15, 16), False),
    "d4-even": (4, 10, 6, 1, {"strides": [2, 2], "pads": [1, 2, 2, 1]}, (1, 6, 12, 11), True),
    "d4-dilation2": (4, 8, 3, 1, {"dilations": [2, 2], "pads": [3, 3, 3, 3]}, (1, 3, 10, 10), False),
    "d2": (2, 6, 3, 1, {"pads": [0, 1, 1, 0]}, (1, 3, 6, 6), True),
    "d3-groups2": (3, 6, 4, 2, {"pads": [1, 1, 1, 1], "strides": [2, 2]}, (1, 8, 9, 9), True),
    "d5-groups2-partial": (5, 7, 3, 2, {"pads": [2, 2, 2, 2]}, (1, 6, 9, 9), True),
}


@pytest.mark.parametrize("case", sorted(SPATIAL_CASES))
def test_spatial_exact_kernel_is_reproduced(rng, case):
    d, per, channels, groups, attrs, shape, with_bias = SPATIAL_CASES[case]
    kernel = spatial_kernel(rng, per, channels, d, groups)
    bias = rng.standard_normal(per * groups) if with_bias else None
    model = conv_model(shape, kernel, bias, group=groups, **attrs)
    factors = spatial_versatile(kernel, groups=groups)
    assert factors.rel_error < EXACT_FIT
    s = (d + 1) // 2
    assert factors.primaries.shape == (groups * math.ceil(per / s), channels, d, d)
    assert len(factors.assignment) == per * groups
    assert len(set(factors.assignment)) == per * groups
    rewritten = rewrite(model, apply_spatial_versatile, factors)
    convs = [n for n in rewritten.graph.node if n.op_type == "Conv"]
    assert len(convs) == min(s, per)
    assert all(n.name.startswith("layer/versatile/") for n in rewritten.graph.node)
    dilations = attrs.get("dilations", [1, 1])
    pads = attrs.get("pads", [0, 0, 0, 0])
    needs_slice = any(pads[k] < (min(s, per) - 1) * dilations[k % 2] for k in range(4))
    assert any(n.op_type == "Slice" for n in rewritten.graph.node) == needs_slice
    assert [o.name for o in rewritten.graph.output] == ["y"]
    assert_numerically_equal(model, rewritten, feed(rng, shape))


def test_spatial_dynamic_batch(rng):
    kernel = spatial_kernel(rng, 12, 5, 3)
    model = conv_model((1, 5, 8, 8), kernel, rng.standard_normal(12), dynamic_batch=True, pads=[0, 0, 0, 0])
    rewritten = rewrite(model, apply_spatial_versatile, spatial_versatile(kernel))
    for batch in (1, 3):
        assert_numerically_equal(model, rewritten, feed(rng, (batch, 5, 8, 8)))


@pytest.mark.parametrize(("d", "groups", "attrs"), [(3, 1, {"pads": [1, 1, 1, 1]}),
                                                     (5, 1, {"strides": [2, 2], "pads": [0, 2, 1, 0]}),
                                                     (4, 2, {"pads": [1, 1, 2, 2]})])
def test_spatial_random_kernel_matches_its_reconstruction(rng, d, groups, attrs):
    kernel = rng.standard_normal((16, 4, d, d))
    bias = rng.standard_normal(16)
    factors = spatial_versatile(kernel, groups=groups)
    assert 0.0 < factors.rel_error < 1.0
    assert factors.rel_error == pytest.approx(relative_error(kernel, factors.to_tensor()))
    shape = (2, 4 * groups, 10, 9)
    model = conv_model(shape, kernel, bias, group=groups, **attrs)
    reconstructed = conv_model(shape, factors.to_tensor(), bias, group=groups, **attrs)
    rewritten = rewrite(model, apply_spatial_versatile, factors)
    assert_numerically_equal(reconstructed, rewritten, feed(rng, shape))


def test_spatial_fit_is_deterministic_and_between_its_bounds(rng):
    kernel = rng.standard_normal((12, 3, 3, 3))
    first, second = spatial_versatile(kernel), spatial_versatile(kernel.copy())
    assert first.assignment == second.assignment
    assert np.array_equal(first.primaries, second.primaries)
    masks = nested_masks(3)
    # floor: each filter masked to its level, nothing shared
    floor = np.stack([kernel[t] * masks[level - 1] for t, (_, level) in enumerate(first.assignment)])
    assert first.rel_error >= relative_error(kernel, floor) - 1e-12
    # ceiling: the naive pairing (2p at level 1, 2p + 1 at level 2, the centre averaged)
    naive = kernel.copy()
    naive[1::2] *= masks[1]
    centre = (kernel[0::2, :, 1, 1] + kernel[1::2, :, 1, 1]) / 2
    naive[0::2, :, 1, 1] = naive[1::2, :, 1, 1] = centre
    assert first.rel_error <= relative_error(kernel, naive)


def test_spatial_costs(rng):
    kernel = spatial_kernel(rng, 12, 5, 3)
    model = conv_model((2, 5, 9, 10), kernel, rng.standard_normal(12), pads=[1, 1, 1, 1])
    layer = inspect(model).layers[0]
    factors = spatial_versatile(kernel)
    macs, params = versatile_costs(layer, factors)
    # 6 primaries: level 1 full 3x3, level 2 the 1x1 centre
    assert params == 6 * 5 * 9 + 6 * 5 * 1 + 12
    assert macs == 2 * 9 * 10 * (6 * 5 * 9 + 6 * 5 * 1)
    assert macs == pytest.approx(layer.macs * factors.macs_ratio)
    assert factors.macs_ratio == pytest.approx(10 / 18)


@pytest.mark.parametrize(("kernel_shape", "groups", "message"), [
    ((4, 3, 3), 1, "2-D conv kernel"),
    ((4, 3, 3, 5), 1, "square kernel"),
    ((4, 3, 1, 1), 1, "d >= 2"),
    ((6, 3, 3, 3), 4, "not divisible by groups=4"),
])
def test_spatial_fit_refuses_with_a_reason(rng, kernel_shape, groups, message):
    with pytest.raises(ValueError, match=message):
        spatial_versatile(rng.standard_normal(kernel_shape), groups=groups)


# ---------------------------------------------------------------------------------------------
# Channel versatile filters

CHANNEL_CASES = {
    # name: (T, S, c_hat, g_c, P, kernel, attrs, input shape, bias)
    "all-outputs-bias": (12, 8, 4, 2, 4, (3, 3), {"pads": [1, 1, 1, 1]}, (2, 8, 7, 9), True),
    "unused-output": (11, 8, 4, 2, 4, (3, 3), {"pads": [1, 1, 1, 1]}, (1, 8, 6, 6), False),
    "stride2-dilation2-asym": (6, 6, 2, 4, 3, (3, 3), {"strides": [2, 2], "dilations": [2, 2],
                                                          "pads": [0, 1, 2, 1]}, (1, 6, 12, 11), True),
    "non-square-valid": (8, 10, 4, 3, 3, (1, 3), {"strides": [1, 2]}, (1, 10, 5, 9), True),
    "disjoint-windows": (8, 8, 4, 4, 4, (2, 2), {"pads": [0, 1, 1, 0]}, (1, 8, 5, 5), False),
}


@pytest.mark.parametrize("case", sorted(CHANNEL_CASES))
def test_channel_exact_kernel_is_reproduced(rng, case):
    count, channels, c_hat, stride, n_prim, kernel_size, attrs, shape, with_bias = CHANNEL_CASES[case]
    kernel = channel_kernel(rng, count, channels, c_hat, stride, n_prim, kernel_size)
    bias = rng.standard_normal(count) if with_bias else None
    model = conv_model(shape, kernel, bias, **attrs)
    factors = channel_versatile(kernel, c_hat, stride)
    assert factors.rel_error < EXACT_FIT
    assert factors.primaries.shape == (n_prim, 1, c_hat, *kernel_size)
    assert len(set(factors.selection)) == count
    rewritten = rewrite(model, apply_channel_versatile, factors)
    conv = next(n for n in rewritten.graph.node if n.op_type == "Conv")
    assert conv.name == "layer/versatile/Conv3d"
    assert_numerically_equal(model, rewritten, feed(rng, shape))


def test_channel_dynamic_batch_and_size(rng):
    kernel = channel_kernel(rng, 12, 8, 4, 2, 4)
    bias = rng.standard_normal(12)
    graph_shape = ["N", 8, "H", "W"]
    model = conv_model((1, 8, 7, 7), kernel, bias, dynamic_batch=True, pads=[1, 1, 1, 1])
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = graph_shape[2]
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = graph_shape[3]
    rewritten = rewrite(model, apply_channel_versatile, channel_versatile(kernel, 4, 2), ["x:1x8x7x7"])
    for shape in ((1, 8, 7, 7), (3, 8, 5, 9)):
        assert_numerically_equal(model, rewritten, feed(rng, shape))


@pytest.mark.parametrize(("c_hat", "stride", "n_primaries"), [(4, 2, None), (6, 2, 9), (3, 1, None)])
def test_channel_random_kernel_matches_its_reconstruction(rng, c_hat, stride, n_primaries):
    kernel = rng.standard_normal((12, 8, 3, 3))
    bias = rng.standard_normal(12)
    factors = channel_versatile(kernel, c_hat, stride, n_primaries=n_primaries)
    assert 0.0 < factors.rel_error < 1.0
    assert factors.rel_error == pytest.approx(relative_error(kernel, factors.to_tensor()))
    shape = (2, 8, 9, 8)
    attrs = {"strides": [2, 1], "pads": [1, 0, 1, 2]}
    reconstructed = conv_model(shape, factors.to_tensor(), bias, **attrs)
    rewritten = rewrite(conv_model(shape, kernel, bias, **attrs), apply_channel_versatile, factors)
    assert_numerically_equal(reconstructed, rewritten, feed(rng, shape))


def test_channel_costs(rng):
    kernel = rng.standard_normal((12, 8, 3, 3))
    model = conv_model((2, 8, 9, 10), kernel, rng.standard_normal(12), pads=[1, 1, 1, 1])
    layer = inspect(model).layers[0]
    factors = channel_versatile(kernel, 4, 2)  # n = 3, P = 4
    macs, params = versatile_costs(layer, factors)
    assert params == 4 * 4 * 9 + 12
    assert macs == 2 * 4 * 3 * 9 * 10 * 4 * 9
    assert macs == pytest.approx(layer.macs * factors.macs_ratio)


@pytest.mark.parametrize(("args", "groups", "message"), [
    ((8, 2), 1, "c_hat must be smaller than the 8 input channels"),
    ((3, 2), 1, "must divide S - c_hat"),
    ((4, 2, 3), 1, "need at least 4"),
    ((4, 2), 2, "ungrouped"),
])
def test_channel_fit_refuses_with_a_reason(rng, args, groups, message):
    with pytest.raises(ValueError, match=message):
        channel_versatile(rng.standard_normal((12, 8, 3, 3)), *args, groups=groups)


# ---------------------------------------------------------------------------------------------
# Builders refuse what they cannot express


def test_builders_refuse_auto_pad_same_with_stride(rng):
    kernel = spatial_kernel(rng, 8, 4, 3)
    model = conv_model((1, 4, 9, 9), kernel, auto_pad="SAME_UPPER", strides=[2, 2])
    layer = inspect(model).layers[0]
    assert layer.conv.pads is None
    assert "auto_pad=SAME_UPPER" in spatial_versatile_reason(layer)
    assert "auto_pad=SAME_UPPER" in channel_versatile_reason(layer)
    with pytest.raises(ValueError, match="auto_pad=SAME_UPPER"):
        rewrite(model, apply_spatial_versatile, spatial_versatile(kernel))
    with pytest.raises(ValueError, match="auto_pad=SAME_UPPER"):
        rewrite(model, apply_channel_versatile, channel_versatile(kernel, 2, 2))


def test_auto_pad_same_with_stride_one_is_explicit_and_works(rng):
    kernel = spatial_kernel(rng, 8, 4, 3)
    model = conv_model((1, 4, 9, 9), kernel, auto_pad="SAME_UPPER")
    rewritten = rewrite(model, apply_spatial_versatile, spatial_versatile(kernel))
    assert_numerically_equal(model, rewritten, feed(rng, (1, 4, 9, 9)))


def test_builders_refuse_other_layers(rng):
    grouped = conv_model((1, 8, 6, 6), rng.standard_normal((8, 4, 3, 3)), group=2)
    with pytest.raises(ValueError, match="ungrouped convolution.*2 groups"):
        rewrite(grouped, apply_channel_versatile, channel_versatile(rng.standard_normal((8, 4, 3, 3)), 2, 2))
    non_square = conv_model((1, 4, 6, 6), rng.standard_normal((8, 4, 3, 1)))
    assert "square kernel" in spatial_versatile_reason(inspect(non_square).layers[0])
    one_d = conv_model((1, 4, 6), rng.standard_normal((8, 4, 3)))
    assert "2-D convolution" in spatial_versatile_reason(inspect(one_d).layers[0])
    single_channel = conv_model((1, 1, 6, 6), rng.standard_normal((8, 1, 3, 3)))
    assert "at least 2 input channels" in channel_versatile_reason(inspect(single_channel).layers[0])
    model = conv_model((1, 4, 6, 6), rng.standard_normal((8, 4, 3, 3)))
    wrong = spatial_versatile(rng.standard_normal((8, 4, 5, 5)))
    with pytest.raises(ValueError, match=r"factors are of a \[8, 4, 5, 5\] kernel"):
        rewrite(model, apply_spatial_versatile, wrong)
    with pytest.raises(TypeError, match="expected SpatialVersatileFactors"):
        rewrite(model, apply_spatial_versatile, channel_versatile(rng.standard_normal((8, 4, 3, 3)), 2, 2))


def test_result_types(rng):
    spatial = spatial_versatile(rng.standard_normal((8, 4, 3, 3)))
    channel = channel_versatile(rng.standard_normal((8, 4, 3, 3)), 2, 1)
    assert isinstance(spatial, SpatialVersatileFactors) and spatial.method == "versatile"
    assert isinstance(channel, ChannelVersatileFactors) and channel.method == "versatile-channel"
    assert spatial.n_params == 4 * 4 * 9 and channel.n_params == 3 * 2 * 9
    assert not spatial.primaries.flags.writeable and not channel.primaries.flags.writeable
    assert run(conv_model((1, 4, 5, 5), spatial.to_tensor()), feed(rng, (1, 4, 5, 5)))[0].shape == (1, 8, 3, 3)
