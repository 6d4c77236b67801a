"""onnx_lowrank.validate: the `validate` command's comparison of two model files, and its table."""

import json

import numpy as np
import onnx
import pytest
from conftest import bad_reshape_model, classifier_model, unary_model

from onnx_lowrank import runtime
from onnx_lowrank.errors import InputError
from onnx_lowrank.validate import format_table, validate_models

EXPECTED_PROVIDER = "CUDAExecutionProvider" if runtime._probe(runtime.CUDA)[0] else "CPUExecutionProvider"


def test_model_against_itself(tmp_path):
    path = tmp_path / "clf.onnx"
    onnx.save(classifier_model(), path)
    result = validate_models(path, path, count=4, latency=False)
    assert result.provider == EXPECTED_PROVIDER
    assert result.inputs == 4
    (out,) = result.outputs
    assert out.name == "logits"
    assert out.rel_l2 == 0.0 and out.max_abs == 0.0
    assert out.cosine == pytest.approx(1.0, abs=1e-12)
    assert result.top1_agreement == 1.0
    assert result.latency_before is None and result.speedup is None


def test_to_dict_is_the_contract(tmp_path):
    path = tmp_path / "clf.onnx"
    onnx.save(classifier_model(), path)
    result = validate_models(path, path, count=2, warmup=1, repeats=3, provider="cpu")
    d = result.to_dict()
    assert list(d) == ["provider", "inputs", "batches", "outputs", "top1_agreement", "top1_ci95", "latency_ms",
                       "speedup", "metric", "metric_ci95"]
    assert d["provider"] == "CPUExecutionProvider" and (d["inputs"], d["batches"]) == (2, 2)
    assert d["outputs"] == [{"name": "logits", "rel_l2": 0.0, "max_abs": 0.0, "cosine": d["outputs"][0]["cosine"],
                             "before_activation": None}]
    lo, hi = d["top1_ci95"]
    assert d["top1_agreement"] == 1.0 and hi == 1.0 and 0.1 < lo < 0.5       # Wilson, 2 of 2
    assert set(d["latency_ms"]) == {"before", "after"}
    assert set(d["latency_ms"]["before"]) == {"median", "p90"}
    assert d["speedup"] == pytest.approx(d["latency_ms"]["before"]["median"] / d["latency_ms"]["after"]["median"])
    assert d["metric"] is None
    json.loads(json.dumps(d, allow_nan=False))


def test_validate_models_with_npz_shapes_and_metric(tmp_path):
    original, candidate = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(classifier_model(0), original)
    onnx.save(classifier_model(1), candidate)
    calib = tmp_path / "calib.npz"
    images = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(calib, image=images)
    result = validate_models(original, candidate, calib=calib, input_shapes=["image:2x3x8x8"], latency=False,
                             metric="top1")
    assert (result.inputs, result.batches) == (6, 3)
    assert result.metric == result.top1_agreement
    assert result.outputs[0].rel_l2 > 0.1  # different weights
    with pytest.raises(InputError, match="unknown input name 'img'"):
        validate_models(original, candidate, input_shapes={"img": (1, 3, 8, 8)}, latency=False)
    with pytest.raises(InputError, match=r"nope.onnx: no such file \(the candidate model\)"):
        validate_models(original, tmp_path / "nope.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not onnx")
    with pytest.raises(InputError, match="cannot read candidate model"):
        validate_models(original, garbage)
    other = tmp_path / "other.onnx"
    onnx.save(unary_model(["Relu"], [1, 4]), other)
    with pytest.raises(InputError, match="candidate has input.*x"):
        validate_models(original, other)


def test_both_files_are_the_users(tmp_path):
    """A candidate file that onnxruntime cannot run is bad input (exit 2), named by its path."""
    original, candidate = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(unary_model(["Relu"], [1, 4]), original)
    onnx.save(bad_reshape_model(), candidate)
    with pytest.raises(InputError, match=r"the candidate model .*b.onnx failed on input 0 \(x \(1, 4\) float32\)"):
        validate_models(original, candidate, latency=False, provider="cpu")


def test_external_data_model_by_path(tmp_path):
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save(classifier_model(), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (path.parent / "weights.bin").exists()
    result = validate_models(path, classifier_model(), count=2, latency=False, provider="cpu")
    assert result.outputs[0].rel_l2 == 0.0


def test_format_table_renders(tmp_path):
    from rich.console import Console

    path = tmp_path / "clf.onnx"
    onnx.save(classifier_model(), path)
    result = validate_models(path, path, count=2, warmup=1, repeats=2, provider="cpu")
    console = Console(record=True, width=120)
    console.print(format_table(result))
    text = console.export_text()
    assert "logits" in text and "CPUExecutionProvider" in text
    assert "top-1 agreement 100.00%" in text and "speed-up" in text
