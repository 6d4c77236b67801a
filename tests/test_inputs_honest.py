"""Defaults that serve the user: every input used and counted as samples, intervals, warnings,
before-activation errors, and inputs from the user's own pipeline."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model
from onnx_lowrank import Settings, api
from onnx_lowrank.cli import main
from onnx_lowrank.intervals import bound_check, wilson
from onnx_lowrank.passes.prepare import CALIB_CAP
from onnx_lowrank.report import compression_report

DIGITS = "models/digits_cnn.onnx"


def digits_npz(path, count, seed=0):
    pool = np.concatenate([np.load("models/digits_train.npz")["input"], np.load("models/digits_test.npz")["input"]])
    np.savez(path, input=pool[np.random.default_rng(seed).permutation(len(pool))[:count]])
    return path


def test_every_calibration_and_eval_input_is_used_and_counted_as_samples(tmp_path):
    calib, evaluation = digits_npz(tmp_path / "calib.npz", 300), digits_npz(tmp_path / "eval.npz", 200, seed=1)
    settings = Settings(rank_ratio=0.5, calib=str(calib), eval=str(evaluation), batch_size=32, latency=False)
    result = api.compress(DIGITS, tmp_path / "out.onnx", settings)
    inputs = next(t for t in result.timings if t.name == "inputs").result.summary
    assert CALIB_CAP < 300
    assert f"{CALIB_CAP} samples from {calib} (the default cap; --calib-count N for more)" in inputs
    assert f"200 samples from {evaluation}" in inputs and inputs.count("default cap") == 1
    assert compression_report(result, "in.onnx", "out.onnx")["inputs"] == inputs    # what the CLI prints
    evaluated = api.compress(DIGITS, None, Settings(rank_ratio=0.5, calib=str(calib), eval=str(evaluation),
                                                    eval_count=CALIB_CAP, batch_size=32, latency=False))
    summary = next(t for t in evaluated.timings if t.name == "inputs").result.summary
    assert summary.endswith(f"{CALIB_CAP} samples from {evaluation}")              # an eval count is no cap
    assert (result.validation.inputs, result.validation.batches) == (200, 7)
    capped = api.compress(DIGITS, None, Settings(rank_ratio=0.5, calib=str(calib), calib_count=40, batch_size=32,
                                                 latency=False))
    assert capped.validation.inputs == 40


def test_wilson_intervals_of_known_cases():
    np.testing.assert_allclose(wilson(81, 263), (0.2553, 0.3662), atol=5e-5)   # Newcombe 1998's example
    np.testing.assert_allclose(wilson(16, 16), (0.8064, 1.0), atol=5e-5)
    np.testing.assert_allclose(wilson(0, 10), (0.0, 0.2775), atol=5e-5)


def test_a_bound_inside_the_interval_is_reported_as_straddled(tmp_path):
    assert bound_check(0.94, (0.90, 0.97), 0.93) == {"bound": 0.93, "met": True, "straddles": True}
    assert bound_check(0.94, (0.935, 0.95), 0.93)["straddles"] is False
    calib = digits_npz(tmp_path / "calib.npz", 32)
    code = main(["compress", DIGITS, "-o", str(tmp_path / "out.onnx"), "--rank-ratio", "0.25", "--calib", str(calib),
                 "--no-latency", "--metric", "top1", "--min-metric", "0.7", "--report", str(tmp_path / "report")])
    assert code == 0
    validation = json.loads((tmp_path / "report" / "report.json").read_text())["validation"]
    lo, hi = validation["metric_ci95"]
    assert validation["metric_bound"]["straddles"] == (lo < 0.7 < hi)
    assert lo <= validation["metric"] <= hi and validation["inputs"] == 32
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "95 % CI" in markdown


def saturated_sigmoid_model(rng):
    """Conv -> Mul (a per-channel scale, folded into the conv) -> Sigmoid, driven to ~1e-5."""
    weight = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.full(2, -11.5, np.float32), "b"),
             numpy_helper.from_array(np.full((1, 2, 1, 1), 0.5, np.float32), "s")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "s"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def test_an_exact_model_of_a_saturated_sigmoid_is_exact_before_the_activation(tmp_path, rng):
    model = saturated_sigmoid_model(rng)
    np.savez(tmp_path / "calib.npz", x=(rng.random((16, 3, 8, 8)) * 0.1).astype(np.float32))
    result = api.compress(model, None, Settings(method="svd", rank_ratio=1.0, calib=str(tmp_path / "calib.npz"),
                                                data_aware=False, latency=False))
    (output,) = result.validation.outputs
    assert output.before_activation is not None and output.activation == "Sigmoid"
    assert output.before_activation.rel_l2 < 1e-5
    assert result.validation.max_rel_l2 == output.before_activation.rel_l2


def test_compress_without_calibration_warns_once_unless_data_awareness_is_off(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank"):
        api.compress(DIGITS, None, Settings(rank_ratio=0.5, validate=False))
    assert sum("no --calib" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank"):
        api.compress(DIGITS, None, Settings(rank_ratio=0.5, validate=False, data_aware=False))
    assert not any("no --calib" in r.getMessage() for r in caplog.records)


def test_inputs_from_a_folder_of_npy_files_and_from_a_function(tmp_path, monkeypatch):
    samples = np.load("models/digits_test.npz")["input"][:40]
    folder = tmp_path / "npy"
    folder.mkdir()
    for index, sample in enumerate(samples[:30]):
        np.save(folder / f"{index:03d}.npy", sample[0] if index % 2 else sample)     # [8, 8] rank mismatch
    np.save(folder / "rest.npy", samples[30:])                                       # a stack of 10
    (tmp_path / "loader.py").write_text(
        "import numpy as np\n"
        "def feeds():\n"
        "    x = np.load('models/digits_test.npz')['input'][:40]\n"
        "    return ({'input': x[i:i + 8]} for i in range(0, 40, 8))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(Exception, match="rank|shape"):
        api.compress(DIGITS, None, Settings(rank_ratio=0.5, calib=str(folder), latency=False))
    for index, sample in enumerate(samples[:30]):
        np.save(folder / f"{index:03d}.npy", sample)
    for source in (str(folder), "loader:feeds", f"{tmp_path / 'loader.py'}:feeds"):
        result = api.compress(DIGITS, None, Settings(rank_ratio=0.5, calib=source, calib_count=36, latency=False))
        assert result.validation.inputs == 36, source
