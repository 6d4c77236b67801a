"""Every rewrite at full rank reproduces the original node in onnxruntime (relative error < 1e-5).

Configurations are drawn by hypothesis: 1-D/2-D/3-D, non-square kernels 1..5, strides 1..3,
dilations 1..3, asymmetric pads, every auto_pad value, groups, with and without bias, batch > 1,
odd spatial sizes. The models are compared in onnxruntime, not against our own math.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import assert_numerically_equal, conv_model, gemm_model, matmul_model
from onnx_lowrank.config import Settings
from onnx_lowrank.methods import MethodSet
from onnx_lowrank.passes import (
    CanonicalizePass, CountPass, FactorizePass, FindLayersPass, Pipeline, RewritePass, Workspace,
)
from onnx_lowrank.ranks import FixedRank, RankRatio

FULL = RankRatio(1.0)
EXACT_METHODS = ("svd", "spatial-svd", "tiled-svd", "tucker2")


def rewrite(model, method, policy=FULL, tiles=(2, 2), require_savings=False):
    """Run the compression passes on `model` and return (rewritten model, workspace)."""
    settings = Settings(method=method, tiles=tiles)
    workspace = Workspace(original=model, model=model, settings=settings)
    Pipeline([CanonicalizePass(), FindLayersPass(),
              FactorizePass(MethodSet(settings), method, policy, require_savings=require_savings),
              RewritePass(), CountPass()]).run(workspace)
    onnx.checker.check_model(workspace.model)
    return workspace.model, workspace


@st.composite
def conv_configs(draw, dims=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2, 3])):
    n = draw(dims)
    g = draw(groups)
    kernel = tuple(draw(st.integers(1, 5 if n < 3 else 3)) for _ in range(n))
    strides = [draw(st.integers(1, 3)) for _ in range(n)]
    dilations = [draw(st.integers(1, 3)) for _ in range(n)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    pads = [draw(st.integers(0, 2)) for _ in range(2 * n)]
    spatial = []
    for d in range(n):
        low = dilations[d] * (kernel[d] - 1) + 1
        spatial.append(draw(st.integers(low, low + (6 if n < 3 else 3))) | 1)
    s = g * draw(st.integers(2, 3))
    t = g * draw(st.integers(2, 3))
    return dict(n=n, groups=g, kernel=kernel, strides=strides, dilations=dilations, auto_pad=auto_pad,
                pads=pads, spatial=spatial, s=s, t=t, batch=draw(st.integers(1, 2)),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def build(config):
    rng = np.random.default_rng(config["seed"])
    weight = rng.standard_normal((config["t"], config["s"] // config["groups"], *config["kernel"]))
    bias = rng.standard_normal(config["t"]) if config["bias"] else None
    attrs = dict(strides=config["strides"], dilations=config["dilations"], group=config["groups"])
    if config["auto_pad"] == "NOTSET":
        attrs["pads"] = config["pads"]
    else:
        attrs["auto_pad"] = config["auto_pad"]
    if config["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):
        del attrs["dilations"]  # onnxruntime refuses dilation with SAME padding: no original to compare
    shape = (config["batch"], config["s"], *config["spatial"])
    model = conv_model(shape, weight, bias, **attrs)
    feed = {"x": rng.standard_normal(shape).astype(np.float32)}
    return model, feed


def check_full_rank(config, method, tiles=(2, 2)):
    model, feed = build(config)
    rewritten, workspace = rewrite(model, method, tiles=tiles)
    decision = workspace.decisions["layer"]
    assert decision.status == "rewritten", decision.reason
    assert_numerically_equal(model, rewritten, feed)


FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(conv_configs())
def test_channel_svd_full_rank_is_exact(config):
    check_full_rank(config, "svd")


@FAST
@given(conv_configs())
def test_tucker2_full_rank_is_exact(config):
    check_full_rank(config, "tucker2")


@FAST
@given(conv_configs(dims=st.just(2)))
def test_spatial_svd_full_rank_is_exact(config):
    check_full_rank(config, "spatial-svd")


@FAST
@given(conv_configs(groups=st.just(1)), st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]))
def test_tiled_svd_full_rank_is_exact(config, tiles):
    config = dict(config, t=6 * config["t"], s=6 * config["s"])
    check_full_rank(config, "tiled-svd", tiles)


def exact_cp_kernel(rng, t, s, kernel, rank, groups=1):
    """A grouped kernel whose every group slice is an exact rank-`rank` CP tensor."""
    slices = []
    for _ in range(groups):
        factors = [rng.standard_normal((size, rank)) for size in (t // groups, s // groups, *kernel)]
        slices.append(np.einsum(
            "ar,br," + ",".join(f"{c}r" for c in "cde"[: len(kernel)]) + "->ab" + "cde"[: len(kernel)],
            *factors))
    return np.concatenate(slices, axis=0)


@pytest.mark.parametrize("method,dims,groups", [
    ("cp", 1, 1), ("cp", 2, 1), ("cp", 2, 2), ("cp", 3, 1), ("cp-depthwise", 2, 1), ("cp-depthwise", 3, 2)])
def test_cp_of_an_exact_cp_kernel_reproduces_the_layer(rng, method, dims, groups):
    kernel = (3, 2, 3)[:dims]
    rank = 3
    if method == "cp":
        weight = exact_cp_kernel(rng, 8, 6, kernel, rank, groups)
    else:  # cp-depthwise: rank-R CP with the spatial modes flattened into one
        slices = []
        for _ in range(groups):
            a, b, c = (rng.standard_normal((n, rank)) for n in (8 // groups, 6 // groups, int(np.prod(kernel))))
            slices.append(np.einsum("ar,br,cr->abc", a, b, c).reshape(8 // groups, 6 // groups, *kernel))
        weight = np.concatenate(slices)
    shape = (2, 6, *(7,) * dims)
    model = conv_model(shape, weight, rng.standard_normal(8), pads=[1] * 2 * dims,
                       strides=[2] + [1] * (dims - 1), dilations=[1] * (dims - 1) + [2], group=groups)
    rewritten, workspace = rewrite(model, method, policy=FixedRank(rank))
    assert workspace.decisions["layer"].weight_rel_error < 1e-4
    feed = {"x": rng.standard_normal(shape).astype(np.float32)}
    assert_numerically_equal(model, rewritten, feed, rtol=1e-4)


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,with_c", itertools.product(
    [0, 1], [0, 1], [1.0, 0.5], [1.0, 2.0], [False, True]))
def test_gemm_full_rank_every_combination(rng, trans_a, trans_b, alpha, beta, with_c):
    m, k, n = 5, 7, 6
    a_shape = (k, m) if trans_a else (m, k)
    b = rng.standard_normal((n, k) if trans_b else (k, n))
    c = rng.standard_normal((m, n) if beta == 2.0 else n) if with_c else None
    model = gemm_model(a_shape, b, c, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    rewritten, _ = rewrite(model, "tucker2")
    assert [node.op_type for node in rewritten.graph.node] == ["Gemm", "Gemm"]
    assert_numerically_equal(model, rewritten, {"a": rng.standard_normal(a_shape).astype(np.float32)})


@pytest.mark.parametrize("x_shape,w_shape,side", [
    ((4, 6), (6, 5), "right"), ((2, 3, 4, 6), (6, 5), "right"), ((3, 6, 4), (5, 6), "left")])
def test_matmul_full_rank_with_batch_dimensions(rng, x_shape, w_shape, side):
    model = matmul_model(x_shape, rng.standard_normal(w_shape), side)
    rewritten, _ = rewrite(model, "svd")
    assert [node.op_type for node in rewritten.graph.node] == ["MatMul", "MatMul"]
    assert_numerically_equal(model, rewritten, {"x": rng.standard_normal(x_shape).astype(np.float32)})


def test_tiles_that_do_not_divide_the_channels_are_refused_with_reason(rng):
    model = conv_model((1, 6, 5, 5), rng.standard_normal((8, 6, 3, 3)))
    _, workspace = rewrite(model, "tiled-svd", tiles=(3, 4))
    decision = workspace.decisions["layer"]
    assert decision.status == "skipped" and "divide" in decision.reason


def test_chain_keeps_output_name_and_names_new_nodes_after_the_layer(rng):
    model = conv_model((1, 8, 6, 6), rng.standard_normal((8, 8, 3, 3)), rng.standard_normal(8), pads=[1] * 4)
    rewritten, _ = rewrite(model, "tucker2", policy=FixedRank(4), require_savings=True)
    names = [node.name for node in rewritten.graph.node]
    assert len(names) == 3 and all(name.startswith("layer/lowrank/") for name in names)
    assert rewritten.graph.node[-1].output[0] == "y" and rewritten.graph.node[-1].input[2] == "B"
    assert "tucker2" in rewritten.graph.node[0].doc_string
    assert any(p.key == "onnx_lowrank.settings" for p in rewritten.metadata_props)


@pytest.mark.parametrize("method", EXACT_METHODS + ("cp", "cp-depthwise"))
def test_whole_digits_model(method):
    model = onnx.load("models/digits_cnn.onnx")
    data = np.load("models/digits_test.npz")
    feed = {"input": data["input"][:16]}
    full, _ = rewrite(model, method)
    if method not in ("cp", "cp-depthwise"):
        assert_numerically_equal(model, full, feed)
    half, workspace = rewrite(model, method, policy=RankRatio(0.5), require_savings=True)
    onnx.checker.check_model(half)
    from conftest import run
    run(half, feed)
    reported = sum(d.macs_after if d.status == "rewritten" else (d.layer.macs or 0)
                   for d in workspace.decisions.values())
    assert reported == workspace.totals_after["macs"]


@st.composite
def conv_transpose_configs(draw):
    n = draw(st.sampled_from([1, 2, 3]))
    g = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 4 if n < 3 else 2)) for _ in range(n))
    strides = [draw(st.integers(1, 3)) for _ in range(n)]
    dilations = [draw(st.integers(1, 2)) for _ in range(n)]
    output_padding = [draw(st.integers(0, strides[d] - 1)) for d in range(n)]  # onnxruntime: < stride
    pads = [draw(st.integers(0, 1)) for _ in range(2 * n)]
    spatial = [draw(st.integers(2, 5 if n < 3 else 3)) for _ in range(n)]
    for d in range(n):
        out = (spatial[d] - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1 + output_padding[d]
        assume(out - pads[d] - pads[n + d] >= 1)
    return dict(n=n, groups=g, kernel=kernel, strides=strides, dilations=dilations, pads=pads,
                output_padding=output_padding, spatial=spatial, s=g * draw(st.integers(2, 3)),
                t=g * draw(st.integers(2, 3)), bias=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@FAST
@given(conv_transpose_configs(), st.sampled_from(["svd", "tucker2"]))
def test_conv_transpose_full_rank_is_exact(config, method):
    rng = np.random.default_rng(config["seed"])
    weight = rng.standard_normal((config["s"], config["t"] // config["groups"], *config["kernel"]))
    bias = rng.standard_normal(config["t"]) if config["bias"] else None
    shape = (2, config["s"], *config["spatial"])
    model = conv_model(shape, weight, bias, op="ConvTranspose", strides=config["strides"],
                       dilations=config["dilations"], pads=config["pads"],
                       output_padding=config["output_padding"], group=config["groups"])
    rewritten, workspace = rewrite(model, method)
    decision = workspace.decisions["layer"]
    assert decision.status == "rewritten", decision.reason
    assert decision.weight_rel_error < 1e-6
    ops = [node.op_type for node in rewritten.graph.node]
    assert ops.count("ConvTranspose") == 1 and len(ops) == (2 if method == "svd" else 3)
    assert_numerically_equal(model, rewritten, {"x": rng.standard_normal(shape).astype(np.float32)})


def test_conv_transpose_truncation_reports_its_costs(rng):
    weight = rng.standard_normal((32, 16, 4, 4))
    model = conv_model((1, 32, 8, 8), weight, op="ConvTranspose", strides=[2, 2], pads=[1, 1, 1, 1])
    rewritten, workspace = rewrite(model, "tucker2", policy=RankRatio(0.25), require_savings=True)
    decision = workspace.decisions["layer"]
    assert decision.status == "rewritten"
    assert decision.macs_after == workspace.totals_after["macs"] < decision.layer.macs


def test_chains_carry_no_subnormal_weights(rng, tmp_path):
    """Dead output channels (rows of subnormals) must not reach the chain: CPUs slow down on them."""
    weight = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    weight[:8] *= np.float32(1e-39)
    model = conv_model((1, 32, 8, 8), weight, pads=[1, 1, 1, 1])
    from onnx_lowrank.api import compress

    workspace = compress(model, tmp_path / "out.onnx", Settings(method="tucker2", rank_ratio=0.5, validate=False))
    assert workspace.rewritten
    tiny = np.finfo(np.float32).tiny
    for tensor in onnx.load(tmp_path / "out.onnx").graph.initializer:
        values = numpy_helper.to_array(tensor)
        assert not np.any((values != 0) & (np.abs(values) < tiny)), tensor.name
