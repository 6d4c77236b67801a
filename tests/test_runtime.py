"""onnx_lowrank.runtime: sessions and whose model failed, IR lowering in place, provider options,
and the CUDA probe with onnxruntime mocked at its boundary (no GPU needed; GPU tests marked)."""

import logging
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import bad_reshape_model, classifier_model, unary_model

from onnx_lowrank import runtime
from onnx_lowrank.cli import main
from onnx_lowrank.errors import InputError, InternalError
from onnx_lowrank.runtime import (
    CPU, CUDA, TENSORRT, ProviderChoice, execution_providers, make_session, probe_reason,
    resolve_provider, runtime_max_ir_version,
)

CUDA_WORKS = runtime._probe(CUDA)[0]
X = {"x": np.array([[-1, 0, 1, 2]], np.float32)}

# ------------------------------------------------------------------ sessions


def test_make_session_sources(tmp_path, monkeypatch):
    model = unary_model(["Relu"], [1, 4])
    for source in (model, model.SerializeToString()):
        session = make_session(source, "cpu", produced=False)
        np.testing.assert_array_equal(session.run(None, X)[0], [[0, 0, 1, 2]])
        assert session.get_providers() == [CPU] and session.provider == CPU
    assert make_session(session, produced=True) is session
    raw = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    assert make_session(raw, produced=False).inner is raw
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert make_session(str(path), "cpu", threads=1, produced=False).run(None, X)[0].shape == (1, 4)
    # A model over the protobuf limit goes through a temporary file with external data.
    monkeypatch.setattr(runtime, "_PROTO_LIMIT", 10)
    big = make_session(classifier_model(), "cpu", produced=True)
    assert big.run(None, {"image": np.zeros((1, 3, 8, 8), np.float32)})[0].shape == (1, 10)


def test_unloadable_model_is_the_users_or_the_tools(tmp_path):
    with pytest.raises(InputError, match="missing.onnx: no such file"):
        make_session(tmp_path / "missing.onnx", "cpu", produced=False)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputError, match=f"onnxruntime cannot load {bad}: ") as users:
        make_session(bad, "cpu", produced=False)
    assert users.value.__cause__ is None
    with pytest.raises(InternalError, match=r"cannot load a segment \(produced by onnx-lowrank\): ") as ours:
        make_session(b"garbage", "cpu", produced=True, label="a segment")
    assert "[ONNXRuntimeError]" in str(ours.value.__cause__)


def test_a_failing_run_names_the_model_and_the_feed():
    feed = {"x": np.ones((1, 4), np.float32)}
    with pytest.raises(InputError, match=r"^the model failed on input 2 \(x \(1, 4\) float32\): "):
        make_session(bad_reshape_model(), "cpu", produced=False, label="the model").run(None, feed, "input 2")
    with pytest.raises(InternalError, match=r"^the model \(produced by onnx-lowrank\) failed on its input"):
        make_session(bad_reshape_model(), "cpu", produced=True).run(None, feed)


def test_newer_ir_version_is_lowered(tmp_path):
    model = unary_model(["Relu"], [1, 4])
    model.ir_version = 99
    assert make_session(model, "cpu", produced=True).run(None, X)[0].shape == (1, 4)
    assert model.ir_version == 99  # the caller's model is not changed
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert make_session(path, "cpu", produced=False).run(None, X)[0].shape == (1, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_lowered_external_data_model_in_a_read_only_folder(tmp_path):
    model = classifier_model()
    model.ir_version = runtime_max_ir_version() + 1
    folder = tmp_path / "ro"
    folder.mkdir()
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    folder.chmod(0o555)
    try:
        before = (sorted(os.listdir(folder)), folder.stat().st_mtime_ns)
        session = make_session(folder / "model.onnx", "cpu", produced=False)
        image = {"image": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
        expected = make_session(classifier_model(), "cpu", produced=True).run(None, image)[0]
        np.testing.assert_array_equal(session.run(None, image)[0], expected)
        # nothing was written there, not even for a moment (root may write to a 0o555 folder)
        assert (sorted(os.listdir(folder)), folder.stat().st_mtime_ns) == before
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------ the error taxonomy end to end


def test_cli_failure_on_a_produced_model_exits_3_and_debug_shows_the_cause(tmp_path, capsys, monkeypatch):
    class RefuseOurs(ort.InferenceSession):
        def __init__(self, source, *args, **kwargs):  # the compressed model carries our provenance
            if isinstance(source, bytes) and b"onnx_lowrank.version" in source:
                raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : a fake kernel failure")
            super().__init__(source, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", RefuseOurs)
    args = ["compress", "models/digits_cnn.onnx", "-o", str(tmp_path / "out.onnx"), "--method", "svd",
            "--provider", "cpu", "--no-latency", "--json"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "internal error: onnxruntime cannot load the candidate model (produced by onnx-lowrank)" in err
    with pytest.raises(InternalError) as debug:
        main(["--debug", *args])
    assert "a fake kernel failure" in str(debug.value.__cause__)


def test_cli_validate_of_a_failing_candidate_file_exits_2(tmp_path, capsys):
    original, candidate = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(unary_model(["Relu"], [1, 4]), original)
    onnx.save(bad_reshape_model(), candidate)
    assert main(["validate", str(original), str(candidate), "--provider", "cpu", "--no-latency"]) == 2
    err = capsys.readouterr().err
    assert "error: the candidate model" in err and "failed on input 0" in err and "Traceback" not in err


# ------------------------------------------------------------------ provider options


def test_execution_providers_carry_the_options(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_LOWRANK_CACHE", str(tmp_path / "cache"))
    assert execution_providers(resolve_provider("cpu"), timing=True) == [CPU]
    cuda = ProviderChoice("cuda", (CUDA, CPU))
    assert execution_providers(cuda, timing=True) == [(CUDA, {"cudnn_conv_algo_search": "EXHAUSTIVE"}), CPU]
    assert execution_providers(cuda) == [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU]
    quick = ProviderChoice("cuda", (CUDA, CPU), conv_algo_search="DEFAULT")
    assert execution_providers(quick, timing=True)[0] == (CUDA, {"cudnn_conv_algo_search": "DEFAULT"})
    engines = str(tmp_path / "cache" / "tensorrt")
    trt = execution_providers(ProviderChoice("tensorrt", (TENSORRT, CUDA, CPU)), timing=True)
    assert trt == [(TENSORRT, {"trt_engine_cache_enable": True, "trt_engine_cache_path": engines,
                               "trt_timing_cache_enable": True, "trt_timing_cache_path": engines}),
                   (CUDA, {"cudnn_conv_algo_search": "EXHAUSTIVE"}), CPU]
    assert os.path.isdir(engines)
    with pytest.raises(InputError, match="cudnn_conv_algo_search must be one of EXHAUSTIVE, HEURISTIC, DEFAULT"):
        resolve_provider("cpu", conv_algo_search="FASTEST")


def test_unwritable_engine_cache_builds_engines_without_it(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ONNX_LOWRANK_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING):
        providers = execution_providers(ProviderChoice("tensorrt", (TENSORRT, CUDA, CPU)))
    assert providers[0] == (TENSORRT, {})
    assert any("engine cache" in r.message for r in caplog.records)


def test_sessions_get_their_options_from_execution_providers(monkeypatch):
    seen = []

    class FakeSession:
        def __init__(self, source, options, providers):
            seen.append((options.graph_optimization_level, providers))

    monkeypatch.setattr(runtime, "_preload_cuda_libraries", lambda: "")
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    choice = ProviderChoice("cuda", (CUDA, CPU))
    model = unary_model(["Relu"], [1, 4])
    make_session(model, choice, produced=True, timing=True)
    make_session(model, choice, produced=True, optimize=False)
    assert seen == [(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, execution_providers(choice, timing=True)),
                    (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, execution_providers(choice))]


# ------------------------------------------------------------------ providers and the probe


def test_provider_names():
    assert resolve_provider("cpu") == ProviderChoice("cpu", (CPU,))
    assert resolve_provider(" CPU ").name == CPU
    assert resolve_provider(CPU).name == CPU
    assert runtime.provider_name("cuda") == CUDA  # named, not probed
    with pytest.raises(InputError, match="unknown provider 'gpu'; expected one of auto, cuda, tensorrt, cpu"):
        resolve_provider("gpu")


MISSING_CUBLAS = (
    "\x1b[1;31m2026-01-01 10:00:00.1 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
    "Failed to load library /x/libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot "
    "open shared object file: No such file or directory\n\x1b[m\n")
PRELOAD_MISSING = (
    "Failed to load libcublasLt.so.13: libcublasLt.so.13: cannot open shared object file: No such file\n"
    "Failed to load libcurand.so.10: libcurand.so.10: cannot open shared object file: No such file\n"
    "Please follow https://onnxruntime.ai/docs/install/#cuda-and-cudnn to install CUDA.\n")


def test_probe_reason_names_the_missing_library():
    assert probe_reason(MISSING_CUBLAS, "fallback") == (
        "cannot load libonnxruntime_providers_cuda.so: libcublasLt.so.13 is missing; "
        "pip install 'onnx-lowrank[cuda]' brings the CUDA libraries")
    assert probe_reason(MISSING_CUBLAS + PRELOAD_MISSING, "fallback") == (
        "cannot load libonnxruntime_providers_cuda.so: libcublasLt.so.13 is missing (also missing: "
        "libcurand.so.10); pip install 'onnx-lowrank[cuda]' brings the CUDA libraries")
    no_gpu = "1 2 [E:onnxruntime:Default, cuda_call.cc:123 CudaCall] CUDA failure 100: no CUDA-capable device is detected"
    assert probe_reason(no_gpu, "fallback") == "CUDA failure 100: no CUDA-capable device is detected"
    assert probe_reason("", "fallback") == "fallback"


class _FakeCudaSession:
    """An InferenceSession on CUDA: `loads` says whether the provider library loads."""

    loads = True

    def __init__(self, source, options, providers):
        if not self.loads:
            os.write(2, MISSING_CUBLAS.encode())  # onnxruntime's C++ logger writes to fd 2
            print("EP Error ... Falling back to ['CPUExecutionProvider'] and retrying.")
        self.providers = [CUDA, CPU] if self.loads else [CPU]

    def get_providers(self):
        return self.providers

    def run(self, names, feed):
        return [np.maximum(feed["x"], 0)]


@pytest.fixture
def fake_cuda(monkeypatch):
    """onnxruntime-gpu as seen from Python, with the probe's caches emptied before and after."""
    for cached in (runtime._probe, runtime._report_fallback):
        cached.cache_clear()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _FakeCudaSession)
    monkeypatch.setattr(runtime, "_preload_cuda_libraries", lambda: PRELOAD_MISSING)
    yield _FakeCudaSession
    for cached in (runtime._probe, runtime._report_fallback):
        cached.cache_clear()


@pytest.mark.parametrize("driver,level", [(True, logging.WARNING), (False, logging.INFO)])
def test_probe_with_a_missing_library(fake_cuda, monkeypatch, caplog, capfd, driver, level):
    monkeypatch.setattr(fake_cuda, "loads", False)
    monkeypatch.setattr(runtime, "_nvidia_driver_present", lambda: driver)
    reason = ("cannot load libonnxruntime_providers_cuda.so: libcublasLt.so.13 is missing (also missing: "
              "libcurand.so.10); pip install 'onnx-lowrank[cuda]' brings the CUDA libraries")
    with caplog.at_level(logging.INFO, logger="onnx_lowrank.runtime"):
        choice = resolve_provider("auto")
        resolve_provider("auto")
    assert choice == ProviderChoice("auto", (CPU,), reason=reason)
    said = [r for r in caplog.records if "--provider auto runs on CPU" in r.message]
    assert len(said) == 1 and said[0].levelno == level and reason in said[0].message  # once a process
    with pytest.raises(InputError, match=re.escape(f"CUDA was requested but onnxruntime cannot use it here: {reason}")):
        resolve_provider("cuda")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # onnxruntime's complaints kept off the terminal


def test_probe_with_a_provider_that_loads(fake_cuda, caplog):
    with caplog.at_level(logging.DEBUG, logger="onnx_lowrank.runtime"):
        choice = resolve_provider("auto")
    assert choice == ProviderChoice("auto", (CUDA, CPU)) and choice.on_gpu and choice.reason is None
    assert resolve_provider("cuda").providers == (CUDA, CPU)
    assert any(r.message == f"{CUDA} works here" for r in caplog.records)
    assert not any("runs on CPU" in r.message for r in caplog.records)


def test_preload_is_quiet_and_says_what_failed(monkeypatch, capfd):
    runtime._preload_cuda_libraries.cache_clear()

    def preload():
        print("Failed to load libcublasLt.so.13: not found")

    monkeypatch.setattr(ort, "preload_dlls", preload, raising=False)
    try:
        assert runtime._preload_cuda_libraries() == "Failed to load libcublasLt.so.13: not found\n"
        assert capfd.readouterr().out == ""
        runtime._preload_cuda_libraries.cache_clear()
        monkeypatch.delattr(ort, "preload_dlls")
        assert runtime._preload_cuda_libraries() == ""  # an onnxruntime without it
    finally:
        runtime._preload_cuda_libraries.cache_clear()


@pytest.mark.skipif(CUDA_WORKS, reason="CUDA works here")
def test_real_probe_without_cuda_is_cpu_and_quiet(capfd):
    runtime._probe.cache_clear()
    choice = resolve_provider("auto")
    assert choice.providers == (CPU,) and not choice.on_gpu and choice.reason
    with pytest.raises(InputError, match="TensorRT was requested but onnxruntime cannot use it here: "):
        resolve_provider("tensorrt")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


# ------------------------------------------------------------------ on a GPU

# TF32 (on by default in onnxruntime's CUDA provider on Ampere and newer) rounds matmul and conv
# inputs to 10 mantissa bits: relative errors ~1e-3 on these small models.
TF32_RTOL = 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_WORKS, reason="needs a working CUDAExecutionProvider")
def test_cuda_agrees_with_cpu_and_times_on_the_device():
    from onnx_lowrank.compare import compare_models
    from onnx_lowrank.timing import Runner

    model = classifier_model(classes=50)
    image = {"image": np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    on_gpu = make_session(model, "cuda", produced=True)
    assert on_gpu.provider == CUDA
    expected = make_session(model, "cpu", produced=True).run(None, image)[0]
    got = on_gpu.run(None, image)[0]
    assert np.linalg.norm(got - expected) <= TF32_RTOL * np.linalg.norm(expected)
    assert compare_models(model, model, [image], provider="cuda").provider == CUDA
    runner = Runner(make_session(model, "cuda", produced=True, timing=True), image)
    assert runner.binding is not None
    times = [runner() for _ in range(5)]
    assert all(t > 0 for t in times)
