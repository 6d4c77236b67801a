"""The public pass pipeline, the Settings <-> CLI contract, and the bugs of the old parallel paths."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model
from onnx_lowrank import InputError, Pass, PassResult, Pipeline, Settings, api, default_pipeline
from onnx_lowrank.cli import build_parser, main
from onnx_lowrank.methods import MethodSet
from onnx_lowrank.passes import (
    CanonicalizePass, FactorizePass, FindLayersPass, LatencyJudge, LoadInputsPass, RewritePass, Workspace,
)
from onnx_lowrank.ranks import RankRatio

DIGITS = "models/digits_cnn.onnx"


class CountNodes(Pass):
    """A user's pass: records the node count of the canonical model."""

    name = "count nodes"
    requires = ("canonical",)

    def __init__(self):
        self.seen = None

    def run(self, workspace, progress):
        self.seen = len(workspace.canonical.graph.node)
        return PassResult(False, f"{self.seen} nodes")


def test_a_user_pass_runs_where_it_is_inserted(tmp_path):
    settings = Settings(rank_ratio=0.5, validate=False)
    extra = CountNodes()
    pipeline = default_pipeline(settings).insert_after("fold", extra)
    assert pipeline.names[pipeline.names.index("fold") + 1] == "count nodes"
    result = api.compress(DIGITS, tmp_path / "out.onnx", settings, passes=pipeline)
    assert extra.seen == len(onnx.load(DIGITS).graph.node)
    assert [t.name for t in result.timings] == pipeline.names
    assert "count nodes" in pipeline.describe()


def test_a_pass_before_what_it_needs_is_refused_before_anything_runs():
    with pytest.raises(InputError, match="pass 'count nodes' needs canonical"):
        default_pipeline(Settings()).insert_before("canonicalize", CountNodes())
    with pytest.raises(InputError, match="no pass named 'nope'"):
        default_pipeline(Settings()).insert_after("nope", CountNodes())
    with pytest.raises(InputError, match="needs calibration"):
        Pipeline([CanonicalizePass(), FindLayersPass(),
                  FactorizePass(MethodSet(Settings()), "svd", RankRatio(0.5), data_aware=True)])


def test_print_pipeline_shows_the_passes_of_the_settings(capsys):
    assert main(["compress", DIGITS, "--method", "auto", "--target-macs", "0.5", "--calib", "x.npz",
                 "--print-pipeline"]) == 0
    out = capsys.readouterr().out
    for name in ("inputs", "data spectra", "output gains", "allocate", "factorize", "validate"):
        assert name in out


def test_every_setting_is_a_compress_option_and_back():
    compress = build_parser()._subparsers._group_actions[0].choices["compress"]
    dests = {action.dest for action in compress._actions}
    fields = {field.name for field in dataclasses.fields(Settings)}
    assert fields <= dests
    assert dests - fields == {"help", "model", "output", "config", "json", "print_pipeline"}


def test_a_config_file_sets_the_report_and_the_speedup_bound(tmp_path, capsys):
    config = tmp_path / "settings.toml"
    config.write_text(f'rank_ratio = 0.5\nreport = "{tmp_path / "report"}"\nrequire_speedup = true\nlatency = false\n')
    code = main(["compress", DIGITS, "-o", str(tmp_path / "out.onnx"), "--config", str(config)])
    assert code == 1 and "--require-speedup" in capsys.readouterr().err
    assert json.loads((tmp_path / "report" / "report.json").read_text())["settings"]["rank_ratio"] == 0.5
    assert (tmp_path / "out.onnx").exists()


def test_the_guard_decides_on_calibration_inputs_not_on_eval_inputs(tmp_path):
    test = np.load("models/digits_test.npz")["input"]
    np.savez(tmp_path / "calib.npz", input=test[:64])
    decisions = []
    for seed in (1, 2):
        evaluation = np.random.default_rng(seed).random((32, 1, 8, 8)).astype(np.float32)
        np.savez(tmp_path / f"eval{seed}.npz", input=evaluation)
        result = api.compress(DIGITS, tmp_path / f"out{seed}.onnx", Settings(
            rank_ratio=0.25, calib=str(tmp_path / "calib.npz"), calib_count=64, eval=str(tmp_path / f"eval{seed}.npz"),
            max_error=0.3, latency=False))
        decisions.append([(layer.name, layer.status, layer.output_rel_error) for layer in result.layers])
    assert decisions[0] == decisions[1]
    assert any(status == "rolled_back" for _, status, _ in decisions[0])


def transpose_and_conv_model(rng):
    """Conv 4->8 (3x3) -> ConvTranspose 8->8 (stride 2) -> Conv 8->8 (3x3): a decoder block."""
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w0", (8, 4, 3, 3)), ("w1", (8, 8, 2, 2)), ("w2", (8, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["a", "w1"], ["b"], name="up", strides=[2, 2]),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="conv1", pads=[1, 1, 1, 1])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def _fit_with_data(model, settings, judge=None, jobs=1):
    workspace = Workspace(original=model, model=model, settings=settings)
    factorize = FactorizePass(MethodSet(settings), settings.method, RankRatio(0.5), data_aware=True,
                              sequential=settings.sequential, jobs=jobs, judge=judge)
    timings = Pipeline([LoadInputsPass(), CanonicalizePass(), FindLayersPass(), factorize, RewritePass()]).run(workspace)
    return workspace, timings


def test_the_latency_judge_times_every_chain_of_a_data_aware_fit(tmp_path, rng):
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 4, 8, 8)).astype(np.float32))
    timed = []

    def timer(model, feed):
        timed.append(model.graph.node[0].name.split("/lowrank/")[0])
        return 0.5 if any("/lowrank/" in node.name for node in model.graph.node) else 1.0

    settings = Settings(method="tucker2", calib=str(tmp_path / "calib.npz"), validate=False, latency_aware=True)
    workspace, _ = _fit_with_data(transpose_and_conv_model(rng), settings, LatencyJudge("cpu", timer=timer))
    up = workspace.decisions["up"]
    assert up.status == "rewritten" and up.latency_ms_before == 1.0 and up.latency_ms_after == 0.5
    assert all(d.latency_ms_before is not None for d in workspace.rewritten)


def test_independent_data_aware_fits_use_the_jobs_and_give_the_same_chains(tmp_path, rng):
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 4, 8, 8)).astype(np.float32))
    model = transpose_and_conv_model(rng)
    settings = Settings(method="svd", calib=str(tmp_path / "calib.npz"), validate=False, sequential=False)
    runs = [_fit_with_data(model, settings, jobs=jobs) for jobs in (1, 2)]
    factorized = [next(t for t in timings if t.name == "factorize").result.summary for _, timings in runs]
    assert "in 2 processes" in factorized[1] and "processes" not in factorized[0]
    one, two = (workspace.model for workspace, _ in runs)
    assert [numpy_helper.to_array(t).tobytes() for t in one.graph.initializer] == \
           [numpy_helper.to_array(t).tobytes() for t in two.graph.initializer]


def test_the_cudnn_algorithm_search_setting_reaches_the_sessions_of_the_run():
    pipeline = default_pipeline(Settings(provider="cpu", cudnn_conv_algo_search="HEURISTIC", latency_aware=True))
    judge = next(p for p in pipeline.passes if p.name == "factorize").judge
    validate = next(p for p in pipeline.passes if p.name == "validate")
    assert judge.provider.conv_algo_search == validate.provider.conv_algo_search == "HEURISTIC"
    with pytest.raises(InputError, match="cudnn-conv-algo-search"):
        Settings(cudnn_conv_algo_search="FAST")
