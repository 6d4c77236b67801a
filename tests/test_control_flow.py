"""Layers inside If, Loop and Scan bodies: rewritten in place, counted, calibrated, validated.

Generated models: Conv layers inside both branches of an If on a sample-rate input (a weight
shared by both branches as an outer-scope initializer, a Constant local to one branch, an
outer-scope weight read by one branch only), inside a Loop (trip count 3, weights outer-scope)
and inside a Scan (4 steps). Every check runs the models in onnxruntime.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import FULL_RANK_RTOL, relative_error, run
from onnx_lowrank import api
from onnx_lowrank.config import Settings
from onnx_lowrank.errors import InputError
from onnx_lowrank.graph import canonicalize, iter_graphs
from onnx_lowrank.inputs import input_specs
from onnx_lowrank.methods import MethodSet
from onnx_lowrank.passes import (
    CanonicalizePass, CountPass, FactorizePass, FindLayersPass, Pipeline, RewritePass, Workspace,
)
from onnx_lowrank.pins import parse_input_values
from onnx_lowrank.ranks import RankRatio

EXACT_METHODS = ("svd", "spatial-svd", "tiled-svd", "tucker2")
IMAGE = [1, 4, 8, 8]


def _tensor(rng, name, shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _value(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "control_flow", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def if_model(seed=0):
    """y = If(sr == 16000): Conv(Relu(Conv(x, shared)), local Constant) else Conv(Conv(x, shared), outer)."""
    rng = np.random.default_rng(seed)
    local = helper.make_node("Constant", [], ["w_then"], name="w_then_constant",
                             value=_tensor(rng, "w_then", (8, 8, 3, 3)))
    then_branch = helper.make_graph(
        [local, helper.make_node("Conv", ["x", "w_shared", "b_shared"], ["a"], name="then_first", pads=[1] * 4),
         helper.make_node("Relu", ["a"], ["r"], name="then_relu"),
         helper.make_node("Conv", ["r", "w_then"], ["y_then"], name="then_second", pads=[1] * 4)],
        "then", [], [_value("y_then", [1, 8, 8, 8])])
    else_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_shared", "b_shared"], ["b"], name="else_first", pads=[1] * 4),
         helper.make_node("Conv", ["b", "w_else"], ["y_else"], name="else_second")],
        "else", [], [_value("y_else", [1, 8, 8, 8])])
    nodes = [helper.make_node("Equal", ["sr", "rate"], ["is_16k"], name="is_16k"),
             helper.make_node("If", ["is_16k"], ["y"], name="by_rate", then_branch=then_branch,
                              else_branch=else_branch)]
    initializers = [_tensor(rng, "w_shared", (8, 4, 3, 3)), _tensor(rng, "b_shared", (8,)),
                    _tensor(rng, "w_else", (8, 8, 1, 1)), numpy_helper.from_array(np.array(16000, np.int64), "rate")]
    return _model(nodes, [_value("x", IMAGE), _value("sr", [], TensorProto.INT64)], [_value("y", [1, 8, 8, 8])],
                  initializers)


def loop_model(seed=0):
    """y = three times v <- Relu(Conv(v, w) + b), the weights outer-scope initializers."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"], name="keep_going"),
         helper.make_node("Conv", ["v", "w", "b"], ["c"], name="loop_conv", pads=[1] * 4),
         helper.make_node("Relu", ["c"], ["v_out"], name="loop_relu")],
        "body", [_value("i", [], TensorProto.INT64), _value("cond", [], TensorProto.BOOL), _value("v", IMAGE)],
        [_value("cond_out", [], TensorProto.BOOL), _value("v_out", IMAGE)])
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="repeat", body=body)]
    initializers = [numpy_helper.from_array(np.array(3, np.int64), "trips"), _tensor(rng, "w", (4, 4, 3, 3)),
                    _tensor(rng, "b", (4,))]
    return _model(nodes, [_value("x", IMAGE)], [_value("y", IMAGE)], initializers)


def scan_model(seed=0):
    """Over 4 frames: s <- s + Conv(frame, w); outputs the last s and every s."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [helper.make_node("Conv", ["frame", "w"], ["c"], name="scan_conv", pads=[1] * 4),
         helper.make_node("Add", ["c", "s"], ["s_out"], name="accumulate"),
         helper.make_node("Identity", ["s_out"], ["seen"], name="emit")],
        "body", [_value("s", [1, 8, 8, 8]), _value("frame", IMAGE)],
        [_value("s_out", [1, 8, 8, 8]), _value("seen", [1, 8, 8, 8])])
    nodes = [helper.make_node("Scan", ["s0", "frames"], ["last", "all"], name="over_frames", body=body,
                              num_scan_inputs=1)]
    return _model(nodes, [_value("s0", [1, 8, 8, 8]), _value("frames", [4, *IMAGE])],
                  [_value("last", [1, 8, 8, 8]), _value("all", [4, 1, 8, 8, 8])], [_tensor(rng, "w", (8, 4, 3, 3))])


BUILDERS = {"if": if_model, "loop": loop_model, "scan": scan_model}


def feeds(kind, rng):
    """Feeds that run every body: both sample rates for the If."""
    if kind == "if":
        x = rng.standard_normal(IMAGE).astype(np.float32)
        return [{"x": x, "sr": np.array(rate, np.int64)} for rate in (16000, 8000)]
    if kind == "loop":
        return [{"x": rng.standard_normal(IMAGE).astype(np.float32)}]
    return [{"s0": rng.standard_normal((1, 8, 8, 8)).astype(np.float32),
             "frames": rng.standard_normal((4, *IMAGE)).astype(np.float32)}]


def rewrite(model, method, ratio, values=()):
    settings = Settings(method=method, input_value=tuple(values))
    workspace = Workspace(original=model, model=model, settings=settings)
    Pipeline([CanonicalizePass(), FindLayersPass(),
              FactorizePass(MethodSet(settings), method, RankRatio(ratio), require_savings=False),
              RewritePass(), CountPass()]).run(workspace)
    onnx.checker.check_model(workspace.model, full_check=True)
    return workspace


def scope_nodes(model):
    """Scope path -> the names of the nodes in it."""
    return {path: [node.name for node in graph.node] for graph, path in iter_graphs(model.graph)}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("method", EXACT_METHODS)
def test_every_exact_method_at_full_rank_reproduces_every_body(kind, method, rng):
    model = BUILDERS[kind]()
    workspace = rewrite(model, method, 1.0, ("sr:16000",) if kind == "if" else ())
    body_layers = [d for d in workspace.decisions.values() if d.layer.subgraph is not None]
    assert body_layers and all(d.status == "rewritten" for d in body_layers)
    for feed in feeds(kind, rng):
        for expected, actual in zip(run(model, feed), run(workspace.model, feed), strict=True):
            assert relative_error(expected, actual) < FULL_RANK_RTOL


def test_half_rank_chains_sit_in_their_bodies_with_their_factors_where_the_body_sees_them(rng):
    workspace = rewrite(if_model(), "tucker2", 0.5, ("sr:16000",))
    model = workspace.model
    nodes = scope_nodes(model)
    for path, layer in (("by_rate/then_branch", "then_first"), ("by_rate/then_branch", "then_second"),
                        ("by_rate/else_branch", "else_first"), ("by_rate/else_branch", "else_second")):
        assert layer not in nodes[path]
        assert any(name.startswith(f"{layer}/lowrank/") for name in nodes[path])
    initializers = {path: {t.name for t in graph.initializer} for graph, path in iter_graphs(model.graph)}
    # The shared outer weight: factorized once, its factors in the main graph, read by both branches.
    shared = {name for name in initializers[None] if name.startswith("w_shared/lowrank/")}
    assert len(shared) == 3   # Tucker-2: three stages
    assert not any(name.startswith(("then_first/lowrank/", "else_first/lowrank/"))
                   for names in initializers.values() for name in names)
    assert "w_shared" not in initializers[None]
    # The local Constant's chain stays local; the outer weight read by one branch only moves out with it.
    assert any(name.startswith("then_second/lowrank/") for name in initializers["by_rate/then_branch"])
    assert "w_then" not in initializers["by_rate/then_branch"]
    assert any(name.startswith("w_else/lowrank/") for name in initializers[None])


@pytest.mark.parametrize("kind,body,layer", [("loop", "repeat/body", "loop_conv"),
                                              ("scan", "over_frames/body", "scan_conv")])
def test_half_rank_loop_and_scan_chains_sit_in_their_bodies(kind, body, layer):
    nodes = scope_nodes(rewrite(BUILDERS[kind](), "tucker2", 0.5).model)   # checked with full_check
    assert layer not in nodes[body] and sum(name.startswith(f"{layer}/lowrank/") for name in nodes[body]) == 3
    assert not any("/lowrank/" in name for name in nodes[None])


def test_bodies_keep_their_inputs_and_outputs():
    original, rewritten = loop_model(), rewrite(loop_model(), "svd", 0.5).model
    before, after = ({path: graph for graph, path in iter_graphs(m.graph)}["repeat/body"] for m in (original, rewritten))
    assert [i.name for i in before.input] == [i.name for i in after.input]
    assert [o.name for o in before.output] == [o.name for o in after.output]
    assert "loop_conv" not in {node.name for node in after.node}


def test_totals_count_the_branch_a_pin_takes_and_every_iteration():
    found = api.inspect(if_model(), input_values=["sr:16000"])
    layers = {layer.name: layer for layer in found.layers}
    conv3 = 8 * 8 * 8 * 4 * 9
    assert layers["then_first"].macs == layers["else_first"].macs == conv3
    assert (layers["then_first"].runs, layers["else_first"].runs) == (1, 0)
    assert "taken for sr=16000" in layers["then_second"].scope and "not taken" in layers["else_second"].scope
    assert found.totals["macs"] == conv3 + 8 * 8 * 8 * 8 * 9
    assert "taken for sr=16000" in found.counting
    # A pin the condition does not read decides nothing: the costlier branch counts.
    unpinned = api.inspect(if_model(), input_values=["x:0"])
    assert "costlier branch" in unpinned.counting and unpinned.totals == found.totals
    # Without a pin the costlier branch counts: the then_branch (a 3x3 second conv, not a 1x1).
    assert api.inspect(if_model()).totals["macs"] == found.totals["macs"]
    assert api.inspect(if_model(), input_values=["sr:8000"]).totals["macs"] == conv3 + 8 * 8 * 8 * 8
    loop = {layer.name: layer for layer in api.inspect(loop_model()).layers}["loop_conv"]
    assert (loop.runs, loop.macs) == (3, 4 * 8 * 8 * 4 * 9) and "3 iterations" in loop.scope
    scan = api.inspect(scan_model())
    assert scan.layers[0].runs == 4 and scan.totals["macs"] == 4 * conv3


def test_calibration_fits_the_taken_branch_to_data_and_says_what_it_could_not(tmp_path, rng):
    x = rng.standard_normal((16, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    model = if_model()
    result = api.compress(model, tmp_path / "out.onnx", Settings(
        method="tucker2", rank_ratio=0.25, calib=str(tmp_path / "calib.npz"), input_value=("sr:16000",),
        latency=False))
    decisions = {layer.name: layer for layer in result.layers}
    assert all(decisions[name].status == "rewritten" for name in decisions)
    assert decisions["then_first"].reason is None and decisions["then_second"].reason is None
    assert "no calibration input runs" in decisions["else_second"].reason
    assert "shares the factors of 'then_first'" in decisions["else_first"].reason
    assert result.validation.inputs == 16
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)
    # The data-aware fit of the taken branch beats the weight-only fit on the calibration inputs.
    weight_only = api.compress(model, None, Settings(method="tucker2", rank_ratio=0.25, data_aware=False,
                                                     input_value=("sr:16000",), validate=False))
    feeds16 = [{"x": x[i:i + 1], "sr": np.array(16000, np.int64)} for i in range(16)]
    errors = [np.mean([relative_error(run(model, f)[0], run(m, f)[0]) for f in feeds16])
              for m in (result.model, weight_only.model)]
    assert errors[0] < errors[1]


def test_a_budget_counts_the_taken_branch_and_keeps_the_other_dense(tmp_path, rng):
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 4, 8, 8)).astype(np.float32))
    result = api.compress(if_model(), None, Settings(
        method="tucker2", target_macs=0.7, calib=str(tmp_path / "calib.npz"), input_value=("sr:16000",),
        rank_multiple=1, validate=False))
    assert abs(result.totals_after["macs"] / result.totals_before["macs"] - 0.7) <= 0.02
    from onnx_lowrank.report import compression_report, validate_report

    report = compression_report(result, "if.onnx", "out.onnx")
    validate_report(report)
    assert "taken for sr=16000" in report["totals"]["counting"]
    other = [layer for layer in result.layers if layer.name.startswith("else_")]
    assert all(layer.status == "skipped" and "not taken for sr=16000" in layer.reason for layer in other)


def _with_trips(model, trips):
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(trips, np.int64), "trips"))
    return changed


def test_loop_and_scan_bodies_run_per_iteration_give_each_layer_its_inputs(rng):
    from onnx_lowrank.branches import view_of
    from onnx_lowrank.iterations import gather

    loop = canonicalize(loop_model())
    feed = feeds("loop", rng)
    found = gather(view_of(loop, feed), loop, [layer for layer in api.inspect(loop).layers], feed)
    expected = [feed[0]["x"]] + [run(_with_trips(loop, trips), feed[0])[0] for trips in (1, 2)]
    assert len(found["loop_conv"]) == 3
    for got, want in zip(found["loop_conv"], expected, strict=True):
        assert relative_error(want, got) < 1e-6
    scan = canonicalize(scan_model())
    feed = feeds("scan", rng)
    found = gather(view_of(scan, feed), scan, list(api.inspect(scan).layers), feed)
    assert np.array_equal(np.stack(found["scan_conv"]), feed[0]["frames"])


def _iteration_error(settings: Settings, feeds_: list[dict]) -> tuple[float, str | None]:
    """The Loop layer's relative output error over the inputs of all its iterations, and its note."""
    from onnx_lowrank.branches import view_of
    from onnx_lowrank.calibrate import layer_vectors
    from onnx_lowrank.fitting import chain_kernel
    from onnx_lowrank.iterations import gather
    from onnx_lowrank.passes import default_pipeline

    model = loop_model()
    workspace = Workspace(original=model, model=model, settings=settings)
    default_pipeline(settings).run(workspace)
    decision = workspace.decisions["loop_conv"]
    layer = decision.layer
    weight, fitted = layer.weight.reshape(4, -1), chain_kernel(layer, decision.chain).reshape(4, -1)
    bias = decision.chain.bias if decision.chain.bias is not None else layer.bias
    residual = energy = 0.0
    for x in gather(view_of(workspace.canonical, feeds_), workspace.canonical, [layer], feeds_)["loop_conv"]:
        patches = next(layer_vectors(layer, x))[0].astype(np.float64)
        y = patches @ weight.T + layer.bias
        residual += float(np.sum((y - patches @ fitted.T - bias) ** 2))
        energy += float(np.sum(y ** 2))
    return np.sqrt(residual / energy), decision.reason


def test_loop_layers_are_fitted_to_their_iterations_and_say_so(tmp_path, rng):
    x = rng.standard_normal((8, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    samples = [{"x": x[i:i + 1]} for i in range(8)]
    fitted, note = _iteration_error(Settings(method="svd", rank_ratio=0.25, calib=str(tmp_path / "calib.npz"),
                                             validate=False), samples)
    assert "fitted to its inputs in every iteration of the body of Loop 'repeat', 3 iterations" in note
    weights_only, note = _iteration_error(Settings(method="svd", rank_ratio=0.25, data_aware=False, validate=False),
                                          samples)
    assert note is None and fitted < 0.8 * weights_only


@pytest.mark.parametrize("text,message", [
    ("sr", "expected NAME:VALUE"), ("rate:16000", "unknown input name 'rate'"),
    ("sr:16000.5", "holds no fraction"), ("sr:fast", "not a number")])
def test_bad_input_values_are_one_line_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_input_values([text], input_specs(if_model()))


def test_validate_fills_a_pinned_input(tmp_path):
    onnx.save(if_model(), tmp_path / "m.onnx")
    from onnx_lowrank.cli import main

    assert main(["validate", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--input-value", "sr:8000",
                 "--no-latency"]) == 0


def test_keep_structure_projects_body_weights_to_the_rewrite(rng):
    rewritten = api.compress(if_model(), None, Settings(method="tucker2", rank_ratio=0.5, data_aware=False,
                                                        input_value=("sr:16000",), validate=False))
    projected = api.compress(if_model(), None, Settings(method="tucker2", rank_ratio=0.5, data_aware=False,
                                                        input_value=("sr:16000",), validate=False,
                                                        keep_structure=True))
    onnx.checker.check_model(projected.model, full_check=True)
    assert scope_nodes(projected.model) == scope_nodes(canonicalize(if_model()))   # the same nodes in every body
    for feed in feeds("if", rng):
        assert relative_error(run(rewritten.model, feed)[0], run(projected.model, feed)[0]) < FULL_RANK_RTOL


def test_the_guard_measures_the_layers_of_the_taken_branch(tmp_path, rng):
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((4, 4, 8, 8)).astype(np.float32))
    result = api.compress(if_model(), None, Settings(method="tucker2", rank_ratio=0.25, data_aware=False,
                                                     calib=str(tmp_path / "calib.npz"), input_value=("sr:16000",),
                                                     max_error=1e-3, validate=False))
    layers = {layer.name: layer for layer in result.layers}
    assert layers["then_second"].status == "rolled_back" and layers["then_second"].output_rel_error > 1e-3
    assert layers["else_second"].status == "rewritten" and layers["else_second"].output_rel_error is None


SILERO = pathlib.Path("~/.cache/onnx-lowrank/models/silero-vad.onnx").expanduser()


@pytest.mark.skipif(not SILERO.exists(), reason="the zoo's silero-vad is not in the cache (tools/fetch_models.py)")
def test_silero_vad_default_export_lists_its_branch_layers_as_candidates():
    found = api.inspect(SILERO, ["input:1x576"], ["sr:16000", "state:0"])
    convs = [layer for layer in found.layers if layer.subgraph is not None]
    assert len(convs) == 12 and sum(layer.candidate for layer in convs) == 10   # two 1x128 output convs: rank 1
    assert all(layer.macs for layer in convs if layer.candidate)
    assert found.totals["macs"] == sum(layer.macs for layer in convs if "then_branch" in layer.subgraph)


def _main_conv_then_loop(seed=0):
    """x -> Relu(Conv(x, w_main)) -> the Loop of `loop_model`: one main-graph layer before a body."""
    model = loop_model(seed)
    rng = np.random.default_rng(seed + 1)
    graph = model.graph
    graph.node[0].input[2] = "h"
    graph.node.insert(0, helper.make_node("Relu", ["c_main"], ["h"], name="main_relu"))
    graph.node.insert(0, helper.make_node("Conv", ["x", "w_main"], ["c_main"], name="main_conv", pads=[1] * 4))
    graph.initializer.append(_tensor(rng, "w_main", (4, 4, 3, 3)))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_activation_aware_and_refine_take_main_graph_layers_and_leave_bodies_to_the_linear_fit(tmp_path, rng):
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 4, 8, 8)).astype(np.float32))
    result = api.compress(_main_conv_then_loop(), tmp_path / "out.onnx", Settings(
        method="svd", rank_ratio=0.5, calib=str(tmp_path / "calib.npz"), activation_aware=True,
        refine_blocks=True, rank_multiple=1, latency=False))
    decisions = {layer.name: layer for layer in result.layers}
    assert decisions["main_conv"].status == "rewritten" and decisions["main_conv"].reason is None
    assert decisions["loop_conv"].status == "rewritten"
    assert "fitted to its inputs in every iteration" in decisions["loop_conv"].reason
    refine = next(timing.result.summary for timing in result.timings if timing.name == "refine")
    assert " of 1 blocks" in refine  # the main conv's block; the Loop body is left to the linear fit
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)
