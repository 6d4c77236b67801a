"""onnx_lowrank.timing: what the Runner puts between the clock readings on CPU and on CUDA (with
onnxruntime mocked at its boundary), latency statistics, the interleaved end-to-end comparison."""

import numpy as np
import pytest
from conftest import classifier_model

from onnx_lowrank import timing
from onnx_lowrank.errors import InputError
from onnx_lowrank.runtime import CPU, CUDA, Session
from onnx_lowrank.timing import LatencyStats, Runner, compare_latency, device_name


class _Named:
    def __init__(self, name):
        self.name = name


class FakeOrt:
    """An InferenceSession, its IO binding, OrtValue and the clock, all writing to one log."""

    def __init__(self, provider):
        self.provider = provider
        self.log: list = []
        self.now = 0

    def clock(self):
        self.now += 1_000_000  # each reading 1 ms after the previous one
        self.log.append("clock")
        return self.now

    # InferenceSession
    def get_providers(self):
        return [self.provider, CPU]

    def get_inputs(self):
        return [_Named("x")]

    def get_outputs(self):
        return [_Named("y")]

    def run(self, names, feed):
        self.log.append(("run", names, sorted(feed)))

    def io_binding(self):
        return self

    def run_with_iobinding(self, binding):
        self.log.append("run_with_iobinding")

    # IO binding and OrtValue
    def bind_ortvalue_input(self, name, value):
        self.log.append(("bind_input", name, value))

    def bind_output(self, name, device, index):
        self.log.append(("bind_output", name, device, index))

    def synchronize_inputs(self):
        self.log.append("synchronize_inputs")

    def synchronize_outputs(self):
        self.log.append("synchronize_outputs")

    def ortvalue_from_numpy(self, value, device, index):
        self.log.append(("to_device", value.shape, device, index))
        return f"device copy of {value.shape}"


def _runner(monkeypatch, provider):
    fake = FakeOrt(provider)
    monkeypatch.setattr(timing.time, "perf_counter_ns", fake.clock)
    monkeypatch.setattr(timing.ort, "OrtValue", fake)
    feed = {"x": np.ones((2, 3), np.float32), "unused": np.ones(1, np.float32)}
    runner = Runner(Session(fake, "the model", produced=True), feed)
    return fake, runner


def test_cpu_runner_times_session_run_alone(monkeypatch):
    fake, runner = _runner(monkeypatch, CPU)
    assert fake.log == [] and runner.binding is None  # nothing runs when the runner is made
    assert runner() == pytest.approx(1.0)
    assert fake.log == ["clock", ("run", None, ["x"]), "clock"]


def test_cuda_runner_binds_on_the_device_primes_and_synchronises(monkeypatch):
    fake, runner = _runner(monkeypatch, CUDA)
    once = ["clock", "run_with_iobinding", "synchronize_outputs", "clock"]
    # inputs copied to the device once, outputs bound there, then one untimed run (cuDNN's
    # algorithm search, TensorRT's engine build) before any run is counted
    assert fake.log == [("to_device", (2, 3), "cuda", 0), ("bind_input", "x", "device copy of (2, 3)"),
                        ("bind_output", "y", "cuda", 0), "synchronize_inputs", *once]
    fake.log.clear()
    assert runner() == pytest.approx(1.0)
    assert fake.log == once  # the device finishes before the clock is read


def test_io_binding_can_be_turned_off(monkeypatch):
    fake = FakeOrt(CUDA)
    monkeypatch.setattr(timing.time, "perf_counter_ns", fake.clock)
    runner = Runner(Session(fake, "the model", produced=True), {"x": np.ones(3, np.float32)}, io_binding=False)
    runner()
    assert runner.binding is None and fake.log == ["clock", ("run", None, ["x"]), "clock"]


def test_latency_stats_from_samples():
    stats = LatencyStats.from_samples([1.0, 2.0, 3.0, 4.0, 10.0])
    assert stats.median_ms == 3.0
    assert stats.p90_ms == pytest.approx(7.6)  # linear interpolation between 4 and 10
    assert stats.to_dict() == {"median": 3.0, "p90": stats.p90_ms}
    with pytest.raises(ValueError, match="no latency samples"):
        LatencyStats.from_samples([])


def test_compare_latency_interleaved():
    small, big = classifier_model(), classifier_model(classes=50)
    feed = {"image": np.ones((1, 3, 8, 8), np.float32)}
    result = compare_latency(small, big, feed, provider="cpu", warmup=2, repeats=6)
    assert result.provider == CPU
    for stats in (result.before, result.after):
        assert len(stats.samples) == 6 and stats.median_ms > 0 and stats.p90_ms >= stats.median_ms
    assert result.speedup == pytest.approx(result.before.median_ms / result.after.median_ms)
    with pytest.raises(InputError, match="repeats"):
        compare_latency(small, big, feed, provider="cpu", repeats=0)


def test_device_name(monkeypatch):
    assert device_name("cpu").endswith("logical CPUs)")
    timing._gpu_name.cache_clear()
    monkeypatch.setattr(timing.shutil, "which", lambda name: None)
    assert device_name("cuda") == "cuda"  # no nvidia-smi to ask
    timing._gpu_name.cache_clear()
