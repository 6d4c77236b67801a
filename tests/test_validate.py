"""Tests for onnx_lowrank.validate: numerics against numpy, providers, latency, the contract."""

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import validate as V
from onnx_lowrank.errors import InputError
from onnx_lowrank.inputs import input_specs, random_feeds, resolve_shapes
from onnx_lowrank.validate import (
    LatencyStats,
    ProviderChoice,
    ValidationResult,
    compare_latency,
    compare_models,
    format_table,
    make_session,
    measure_latency,
    resolve_provider,
    validate_models,
)

# ------------------------------------------------------------------ tiny models


def _finish(graph, ir_version=8):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _linear(w, b):
    """y = x @ w + b with Gemm; x [N, in], y [N, out]."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return _finish(graph)


def _classifier(seed=0, classes=10):
    """Conv(3->4, 3x3, pad 1) + Relu + GlobalAveragePool + Flatten + Gemm(4->classes)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.standard_normal((classes, 4)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=inits,
    )
    return _finish(graph)


def _unary(op_types, shape, out_name="y"):
    """y = op_k(...op_1(x)) on a tensor of ``shape``."""
    nodes, prev = [], "x"
    for i, op in enumerate(op_types):
        out = out_name if i == len(op_types) - 1 else f"t{i}"
        nodes.append(helper.make_node(op, [prev], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "unary",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, shape)],
    )
    return _finish(graph)


def _add_const(const, name="pred"):
    """pred = x + const (const's shape)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], [name])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(const.shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(const.shape))],
        initializer=[numpy_helper.from_array(const, "c")],
    )
    return _finish(graph)


def _cuda_works():
    return V._probe("CUDAExecutionProvider")[0]


EXPECTED_PROVIDER = "CUDAExecutionProvider" if _cuda_works() else "CPUExecutionProvider"


# ------------------------------------------------------------------ numerics


def test_model_against_itself(tmp_path):
    path = tmp_path / "clf.onnx"
    onnx.save(_classifier(), path)
    result = validate_models(path, path, count=4, latency=False)
    assert result.provider == EXPECTED_PROVIDER
    assert result.inputs == 4
    (out,) = result.outputs
    assert out.name == "logits"
    assert out.rel_l2 == 0.0 and out.max_abs == 0.0
    assert out.cosine == pytest.approx(1.0, abs=1e-12)
    assert result.top1_agreement == 1.0
    assert result.latency_before is None and result.speedup is None


def test_perturbed_weights_match_numpy():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    eps = 1e-2
    w2 = (w * (1 + eps * rng.standard_normal(w.shape))).astype(np.float32)
    original, candidate = _linear(w, b), _linear(w2, b)
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


def test_to_dict_is_the_contract(tmp_path):
    path = tmp_path / "clf.onnx"
    onnx.save(_classifier(), path)
    result = validate_models(path, path, count=2, warmup=1, repeats=3, provider="cpu")
    d = result.to_dict()
    assert list(d) == [
        "provider",
        "inputs",
        "outputs",
        "top1_agreement",
        "latency_ms",
        "speedup",
        "metric",
    ]
    assert d["provider"] == "CPUExecutionProvider" and d["inputs"] == 2
    assert d["outputs"] == [
        {"name": "logits", "rel_l2": 0.0, "max_abs": 0.0, "cosine": d["outputs"][0]["cosine"]}
    ]
    assert set(d["latency_ms"]) == {"before", "after"}
    assert set(d["latency_ms"]["before"]) == {"median", "p90"}
    assert d["speedup"] == pytest.approx(
        d["latency_ms"]["before"]["median"] / d["latency_ms"]["after"]["median"]
    )
    assert d["metric"] is None
    json.loads(json.dumps(d, allow_nan=False))
    no_latency = ValidationResult("CPUExecutionProvider", 1, []).to_dict()
    assert no_latency["latency_ms"] is None and no_latency["speedup"] is None


def test_candidate_missing_output_and_shape_mismatch():
    x = np.ones((1, 4), np.float32)
    original = _unary(["Relu"], [1, 4], out_name="y")
    renamed = _unary(["Relu"], [1, 4], out_name="z")
    with pytest.raises(InputError, match="candidate has no output 'y'.*candidate outputs: z"):
        compare_models(original, renamed, [{"x": x}], provider="cpu")
    w = np.ones((4, 3), np.float32)
    wider = np.ones((4, 5), np.float32)
    with pytest.raises(
        InputError, match=r"output 'y' has shape \(1, 3\) in the original but \(1, 5\)"
    ):
        compare_models(
            _linear(w, np.zeros(3, np.float32)),
            _linear(wider, np.zeros(5, np.float32)),
            [{"x": x}],
            provider="cpu",
        )
    with pytest.raises(InputError, match="at least one feed"):
        compare_models(original, original, [], provider="cpu")


def test_bad_feed_is_input_error():
    model = _unary(["Relu"], [1, 4])
    with pytest.raises(InputError, match="the original model failed on input 0"):
        compare_models(model, model, [{"x": np.ones((1, 5), np.float32)}], provider="cpu")


def test_nan_candidate_is_infinite_error():
    original = _unary(["Abs"], [2, 3])
    candidate = _unary(["Abs", "Neg", "Sqrt"], [2, 3])  # sqrt of negatives: NaN
    feeds = [{"x": np.arange(1, 7, dtype=np.float32).reshape(2, 3)}]
    result = compare_models(original, candidate, feeds, provider="cpu")
    out = result.outputs[0]
    assert math.isinf(out.rel_l2) and math.isinf(out.max_abs) and out.cosine == 0.0
    assert result.to_dict()["outputs"][0]["rel_l2"] is None
    assert result.top1_agreement is not None  # [2, 3] looks like a classifier


def test_zero_outputs_and_no_classifier_output():
    zeros = _unary(["Relu"], [1, 2, 3, 3])
    feeds = [{"x": -np.ones((1, 2, 3, 3), np.float32)}]
    result = compare_models(zeros, zeros, feeds, provider="cpu")
    out = result.outputs[0]
    assert (out.rel_l2, out.max_abs, out.cosine) == (0.0, 0.0, 1.0)
    assert result.top1_agreement is None
    # Original all zero, candidate not: infinite relative error, cosine 0.
    ones = _add_const(np.full((1, 2, 3, 3), 2.0, np.float32), name="y")  # -1 + 2 = 1
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
    original = _add_const(np.zeros_like(pred))
    shift = np.zeros_like(pred)
    shift[0, 0, 1] = 250.0  # move box 1 far right
    candidate = _add_const(shift)
    result = compare_models(original, candidate, [{"x": pred}], provider="cpu", metric="detection")
    assert result.metric == pytest.approx(4 / 6)  # TP 2, FP 1, FN 1
    assert result.to_dict()["metric"] == pytest.approx(4 / 6)
    with pytest.raises(InputError, match=r"returned 2.0; expected a float in \[0, 1\]"):
        compare_models(original, candidate, [{"x": pred}], provider="cpu", metric=lambda a, b: 2.0)
    with pytest.raises(InputError, match="returned 'x'"):
        compare_models(original, candidate, [{"x": pred}], provider="cpu", metric=lambda a, b: "x")


def test_validate_models_with_npz_shapes_and_metric(tmp_path):
    original, candidate = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_classifier(0), original)
    onnx.save(_classifier(1), candidate)
    calib = tmp_path / "calib.npz"
    images = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(calib, image=images)
    result = validate_models(
        original,
        candidate,
        calib=calib,
        input_shapes=["image:2x3x8x8"],
        latency=False,
        metric="top1",
    )
    assert result.inputs == 3
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
    onnx.save(_unary(["Relu"], [1, 4]), other)
    with pytest.raises(InputError, match="candidate has input.*x"):
        validate_models(original, other)


def test_external_data_model_by_path(tmp_path):
    model = _classifier()
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (path.parent / "weights.bin").exists()
    result = validate_models(path, _classifier(), count=2, latency=False, provider="cpu")
    assert result.outputs[0].rel_l2 == 0.0


# ------------------------------------------------------------------ sessions


def test_make_session_sources(tmp_path, monkeypatch):
    model = _unary(["Relu"], [1, 4])
    x = {"x": np.array([[-1, 0, 1, 2]], np.float32)}
    for source in (model, model.SerializeToString()):
        session = make_session(source, "cpu")
        np.testing.assert_array_equal(session.run(None, x)[0], [[0, 0, 1, 2]])
        assert session.get_providers() == ["CPUExecutionProvider"]
    assert make_session(session) is session
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert make_session(str(path), "cpu", threads=1).run(None, x)[0].shape == (1, 4)
    with pytest.raises(InputError, match="missing.onnx: no such file"):
        make_session(tmp_path / "missing.onnx", "cpu")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputError, match="onnxruntime cannot load"):
        make_session(bad, "cpu")
    # A model over the protobuf limit goes through a temporary file with external data.
    monkeypatch.setattr(V, "_PROTO_LIMIT", 10)
    big = make_session(_classifier(), "cpu")
    assert big.run(None, {"image": np.zeros((1, 3, 8, 8), np.float32)})[0].shape == (1, 10)


def test_newer_ir_version_is_lowered(tmp_path):
    model = _unary(["Relu"], [1, 4])
    model.ir_version = 99
    x = {"x": np.ones((1, 4), np.float32)}
    assert make_session(model, "cpu").run(None, x)[0].shape == (1, 4)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert make_session(path, "cpu").run(None, x)[0].shape == (1, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left


# ------------------------------------------------------------------ providers


def test_provider_cpu_and_unknown():
    assert resolve_provider("cpu") == ProviderChoice("cpu", ("CPUExecutionProvider",))
    assert resolve_provider(" CPU ").name == "CPUExecutionProvider"
    with pytest.raises(
        InputError, match="unknown provider 'gpu'; expected one of auto, cuda, tensorrt, cpu"
    ):
        resolve_provider("gpu")


@pytest.mark.skipif(_cuda_works(), reason="CUDA works here")
def test_provider_auto_is_cpu_without_cuda_and_quiet(capfd):
    V._probe.cache_clear()
    choice = resolve_provider("auto")
    assert choice.providers == ("CPUExecutionProvider",) and not choice.on_gpu
    assert choice.reason
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # onnxruntime's complaints kept off
    assert V._probe.cache_info().currsize >= 1
    model = _unary(["Relu"], [1, 4])
    feeds = [{"x": np.ones((1, 4), np.float32)}]
    assert compare_models(model, model, feeds).provider == "CPUExecutionProvider"


@pytest.mark.skipif(_cuda_works(), reason="CUDA works here")
def test_explicit_cuda_or_tensorrt_without_it_is_input_error(capfd):
    V._probe.cache_clear()
    with pytest.raises(InputError, match="CUDA was requested but onnxruntime cannot use it here: "):
        resolve_provider("cuda")
    with pytest.raises(
        InputError, match="TensorRT was requested but onnxruntime cannot use it here: "
    ):
        resolve_provider("tensorrt")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_probe_reason_is_one_readable_line():
    captured = (
        "\x1b[1;31m2026-01-01 10:00:00.1 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 "
        "operator()] blah Failed to load library /x/libonnxruntime_providers_cuda.so with "
        "error: libcublasLt.so.13: cannot open shared object file: No such file or directory\n"
        "\x1b[m\n"
    )
    assert V._probe_reason(captured, "fallback") == (
        "cannot load libonnxruntime_providers_cuda.so: libcublasLt.so.13: cannot open shared "
        "object file: No such file or directory"
    )
    assert V._probe_reason("", "fallback") == "fallback"


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_works(), reason="needs a working CUDAExecutionProvider")
def test_cuda_runs_and_is_recorded():
    choice = resolve_provider("cuda")
    assert choice.on_gpu
    model = _classifier()
    feeds = [{"image": np.ones((2, 3, 8, 8), np.float32)}]
    result = compare_models(model, model, feeds, provider="cuda")
    assert result.provider == "CUDAExecutionProvider"
    stats = measure_latency(model, feeds[0], provider="cuda", warmup=2, repeats=5)
    assert stats.median_ms > 0 and stats.p90_ms >= stats.median_ms
    assert resolve_provider("auto").name == "CUDAExecutionProvider"


# ------------------------------------------------------------------ latency


def test_measure_latency():
    model = _classifier()
    feed = {"image": np.ones((1, 3, 8, 8), np.float32)}
    stats = measure_latency(model, feed, provider="cpu", warmup=2, repeats=7)
    assert isinstance(stats, LatencyStats)
    assert len(stats.samples) == 7
    assert stats.median_ms > 0 and stats.p90_ms >= stats.median_ms
    assert stats.median_ms == pytest.approx(float(np.median(stats.samples)))
    with pytest.raises(InputError, match="repeats"):
        measure_latency(model, feed, provider="cpu", repeats=0)


def test_compare_latency_interleaved():
    small, big = _classifier(), _classifier(classes=50)
    feed = {"image": np.ones((1, 3, 8, 8), np.float32)}
    timing = compare_latency(small, big, feed, provider="cpu", warmup=2, repeats=6)
    assert timing.provider == "CPUExecutionProvider"
    for stats in (timing.before, timing.after):
        assert len(stats.samples) == 6 and stats.median_ms > 0 and stats.p90_ms >= stats.median_ms
    assert timing.speedup == pytest.approx(timing.before.median_ms / timing.after.median_ms)


def test_latency_stats_from_samples():
    stats = LatencyStats.from_samples([1.0, 2.0, 3.0, 4.0, 10.0])
    assert stats.median_ms == 3.0
    assert stats.p90_ms == pytest.approx(7.6)  # linear interpolation between 4 and 10
    assert stats.to_dict() == {"median": 3.0, "p90": stats.p90_ms}


# ------------------------------------------------------------------ display


def test_format_table_renders(tmp_path):
    from rich.console import Console

    path = tmp_path / "clf.onnx"
    onnx.save(_classifier(), path)
    result = validate_models(path, path, count=2, warmup=1, repeats=2, provider="cpu")
    console = Console(record=True, width=120)
    console.print(format_table(result))
    text = console.export_text()
    assert "logits" in text and "CPUExecutionProvider" in text
    assert "top-1 agreement 100.00%" in text and "speed-up" in text
