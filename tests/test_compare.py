"""onnx_lowrank.compare: the numbers against numpy, edge cases, whose model failed."""

import math

import numpy as np
import pytest
from conftest import add_const_model, bad_reshape_model, classifier_model, linear_model, unary_model

from onnx_lowrank.compare import ValidationResult, compare_models
from onnx_lowrank.errors import InputError, InternalError
from onnx_lowrank.inputs import input_specs, random_feeds, resolve_shapes


def test_perturbed_weights_match_numpy():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    eps = 1e-2
    w2 = (w * (1 + eps * rng.standard_normal(w.shape))).astype(np.float32)
    original, candidate = linear_model(w, b), linear_model(w2, b)
    specs = input_specs(original)
    feeds = random_feeds(specs, resolve_shapes(specs, {"x": (3, 8)}), count=5, seed=3)
    result = compare_models(original, candidate, feeds, provider="cpu")

    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    ya = x @ w.astype(np.float64) + b
    yb = x @ w2.astype(np.float64) + b
    rel = np.linalg.norm(ya - yb) / np.linalg.norm(ya)
    cos = (ya.ravel() @ yb.ravel()) / (np.linalg.norm(ya) * np.linalg.norm(yb))
    (out,) = result.outputs
    # float32 arithmetic in onnxruntime: the difference is ~eps |y|, its rounding ~1e-7 |y|.
    assert out.rel_l2 == pytest.approx(rel, rel=1e-3)
    assert out.max_abs == pytest.approx(np.abs(ya - yb).max(), rel=1e-3)
    assert out.cosine == pytest.approx(cos, abs=1e-6)
    assert eps / 10 < out.rel_l2 < 10 * eps
    assert result.provider == "CPUExecutionProvider"
    assert result.top1_agreement == pytest.approx(np.mean(ya.argmax(axis=1) == yb.argmax(axis=1)))


def test_model_against_itself_is_exact():
    model = classifier_model()
    feeds = [{"image": np.random.default_rng(i).standard_normal((2, 3, 8, 8)).astype(np.float32)}
             for i in range(3)]
    result = compare_models(model, model, feeds, provider="cpu")
    (out,) = result.outputs
    assert (out.name, out.rel_l2, out.max_abs) == ("logits", 0.0, 0.0)
    assert out.cosine == pytest.approx(1.0, abs=1e-12)
    assert result.top1_agreement == 1.0 and (result.inputs, result.batches) == (6, 3)


def test_candidate_missing_output_and_shape_mismatch():
    x = np.ones((1, 4), np.float32)
    original = unary_model(["Relu"], [1, 4], out_name="y")
    renamed = unary_model(["Relu"], [1, 4], out_name="z")
    with pytest.raises(InputError, match="candidate has no output 'y'.*candidate outputs: z"):
        compare_models(original, renamed, [{"x": x}], provider="cpu")
    w = np.ones((4, 3), np.float32)
    wider = np.ones((4, 5), np.float32)
    with pytest.raises(InputError, match=r"output 'y' has shape \(1, 3\) in the original but \(1, 5\)"):
        compare_models(linear_model(w, np.zeros(3, np.float32)), linear_model(wider, np.zeros(5, np.float32)),
                       [{"x": x}], provider="cpu")
    with pytest.raises(InputError, match="at least one feed"):
        compare_models(original, original, [], provider="cpu")


def test_bad_feed_is_input_error():
    model = unary_model(["Relu"], [1, 4])
    with pytest.raises(InputError, match=r"the original model failed on input 0 \(x \(1, 5\) float32\)"):
        compare_models(model, model, [{"x": np.ones((1, 5), np.float32)}], provider="cpu")


def test_a_failing_candidate_is_the_users_or_the_tools():
    original = unary_model(["Relu"], [1, 4])
    feeds = [{"x": np.ones((1, 4), np.float32)}]
    with pytest.raises(InputError, match="the candidate model failed on input 0") as users:
        compare_models(original, bad_reshape_model(), feeds, provider="cpu")
    assert users.value.__cause__ is None
    with pytest.raises(InternalError, match=r"the candidate model \(produced by onnx-lowrank\) failed on input 0") as ours:
        compare_models(original, bad_reshape_model(), feeds, provider="cpu", candidate_produced=True)
    assert "reshape" in str(ours.value.__cause__).lower()


def test_nan_candidate_is_infinite_error():
    original = unary_model(["Abs"], [2, 3])
    candidate = unary_model(["Abs", "Neg", "Sqrt"], [2, 3])  # sqrt of negatives: NaN
    feeds = [{"x": np.arange(1, 7, dtype=np.float32).reshape(2, 3)}]
    result = compare_models(original, candidate, feeds, provider="cpu")
    out = result.outputs[0]
    assert math.isinf(out.rel_l2) and math.isinf(out.max_abs) and out.cosine == 0.0
    assert result.to_dict()["outputs"][0]["rel_l2"] is None
    assert result.top1_agreement is not None  # [2, 3] looks like a classifier


def test_zero_outputs_and_no_classifier_output():
    zeros = unary_model(["Relu"], [1, 2, 3, 3])
    feeds = [{"x": -np.ones((1, 2, 3, 3), np.float32)}]
    result = compare_models(zeros, zeros, feeds, provider="cpu")
    out = result.outputs[0]
    assert (out.rel_l2, out.max_abs, out.cosine) == (0.0, 0.0, 1.0)
    assert result.top1_agreement is None
    # Original all zero, candidate not: infinite relative error, cosine 0.
    ones = add_const_model(np.full((1, 2, 3, 3), 2.0, np.float32), name="y")  # -1 + 2 = 1
    result = compare_models(zeros, ones, feeds, provider="cpu")
    assert math.isinf(result.outputs[0].rel_l2) and result.outputs[0].cosine == 0.0


def test_metric_plumbing_with_a_fake_yolo_model():
    # Raw YOLOv8 output [1, 4+2, 8] with three boxes (cx, cy, w, h, class scores).
    pred = np.zeros((1, 6, 8), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(
        [(50, 50, 20, 20, 0, 0.9), (150, 50, 30, 30, 1, 0.8), (50, 150, 20, 40, 0, 0.7)]
    ):
        pred[0, :4, i] = (cx, cy, w, h)
        pred[0, 4 + cls, i] = score
    original = add_const_model(np.zeros_like(pred))
    shift = np.zeros_like(pred)
    shift[0, 0, 1] = 250.0  # move box 1 far right
    candidate = add_const_model(shift)
    result = compare_models(original, candidate, [{"x": pred}], provider="cpu", metric="detection")
    assert result.metric == pytest.approx(4 / 6)  # TP 2, FP 1, FN 1
    assert result.to_dict()["metric"] == pytest.approx(4 / 6)
    with pytest.raises(InputError, match=r"returned 2.0; expected a float in \[0, 1\]"):
        compare_models(original, candidate, [{"x": pred}], provider="cpu", metric=lambda a, b: 2.0)
    with pytest.raises(InputError, match="returned 'x'"):
        compare_models(original, candidate, [{"x": pred}], provider="cpu", metric=lambda a, b: "x")


def test_result_without_latency_has_null_latency():
    no_latency = ValidationResult("CPUExecutionProvider", 1, []).to_dict()
    assert no_latency["latency_ms"] is None and no_latency["speedup"] is None
    assert no_latency["outputs"] == [] and no_latency["inputs"] == 1
