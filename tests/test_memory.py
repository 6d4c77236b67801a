"""Memory budgets: wide layers fit data-aware in sample space, and what cannot fit says so."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, run
from onnx_lowrank import InputError, Settings, api
from onnx_lowrank.cli import main
from onnx_lowrank.memory import MemoryBudget, parse_size


def dense_head_model(width: int, hidden: int = 32, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """Flattened features `[N, width]` -> MatMul `width x hidden` -> Relu -> Gemm `hidden x classes`:
    the head of a VGG-style classifier, whose first layer sees one `width`-wide vector per sample."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((hidden, classes)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b1")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="dense0"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w1", "b1"], ["y"], name="dense1")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def features(count: int, width: int, seed: int) -> np.ndarray:
    """Correlated non-negative features (post-ReLU-like), `[count, width]`."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((16, width))
    return np.maximum(rng.standard_normal((count, 16)) @ basis + 0.1 * rng.standard_normal((count, width)), 0
                      ).astype(np.float32)


def test_sizes_parse_and_refuse_nonsense():
    assert parse_size("4G") == 4 << 30 and parse_size("1.5M") == int(1.5 * (1 << 20)) and parse_size(2048) == 2048
    with pytest.raises(InputError, match="--max-memory expects a size"):
        parse_size("lots")
    assert MemoryBudget.from_setting(None).total > 0


def test_fewer_vectors_than_dimensions_are_kept_as_vectors_even_where_dense_moments_fit():
    from onnx_lowrank.calibrate import statistics_form
    from onnx_lowrank.graph import find_layers
    from onnx_lowrank.shapes import infer_shapes

    model = dense_head_model(3000)
    wide, narrow = find_layers(model, infer_shapes(model))
    budget = MemoryBudget.from_setting("4G")                   # dense 3000² moments fit it easily
    assert statistics_form(wide, 64, True, budget, every=True) == 64          # 64 x 3000 vectors: cheaper
    assert statistics_form(wide, 64, True, budget, every=False) is None       # a subset: dense, as before
    assert statistics_form(narrow, 64, True, budget, every=True) is None      # 32 wide: 64 vectors cost more
    assert statistics_form(wide, 64, True, MemoryBudget.from_setting("40M"), every=False) == 99   # what fits 40 MiB


def test_sample_space_statistics_give_the_dense_result(tmp_path, monkeypatch):
    # 64 samples of a 3000-wide head: the vectors by choice (default budget), by need (40 MiB),
    # and the dense moments, forced, must give the same model.
    from onnx_lowrank import calibrate

    model = dense_head_model(3000)
    np.savez(tmp_path / "calib.npz", x=features(64, 3000, seed=1))
    choose = calibrate.statistics_form
    outputs = {}
    for label, limit, form in (("dense", None, lambda layer, n, paired, budget, every=False: choose(
            layer, n, paired, budget)), ("chosen", None, choose), ("needed", "40M", choose)):
        monkeypatch.setattr(calibrate, "statistics_form", form)
        settings = Settings(method="svd", rank=8, calib=str(tmp_path / "calib.npz"), calib_count=64,
                            batch_size=16, validate=False, max_memory=limit)
        api.compress(model, tmp_path / f"{label}.onnx", settings)
        outputs[label] = run(onnx.load(str(tmp_path / f"{label}.onnx")), {"x": features(32, 3000, seed=2)})[0]
    scale = np.abs(outputs["dense"]).max()
    for label in ("chosen", "needed"):
        np.testing.assert_allclose(outputs[label], outputs["dense"], atol=1e-4 * scale)
    assert np.abs(outputs["chosen"] - outputs["dense"]).max() < 1e-5 * scale    # the same vectors: rounding only


def test_a_30000_wide_dense_layer_compresses_data_aware_within_2_gib(tmp_path):
    # Dense moments of a 30000-wide input alone are 7.2 GB (float64); the child may use 2 GiB.
    onnx.save(dense_head_model(30000), str(tmp_path / "wide.onnx"))
    np.savez(tmp_path / "calib.npz", x=features(128, 30000, seed=3))
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from onnx_lowrank.cli import main
        sys.exit(main(["compress", "{tmp_path / 'wide.onnx'}", "-o", "{tmp_path / 'small.onnx'}", "--method", "auto",
                       "--target-macs", "0.5", "--rank-multiple", "4", "--calib", "{tmp_path / 'calib.npz'}",
                       "--calib-count", "128", "--batch-size", "16", "--max-memory", "1500M", "--no-latency"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "small.onnx").exists()


def test_statistics_that_cannot_fit_exit_2_naming_the_flag(tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", input=np.load("models/digits_test.npz")["input"][:32])
    code = main(["compress", "models/digits_cnn.onnx", "-o", str(tmp_path / "out.onnx"), "--calib",
                 str(tmp_path / "calib.npz"), "--max-memory", "64K"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "calibration statistics" in err and "--max-memory" in err
    assert not (tmp_path / "out.onnx").exists()


def test_validation_of_512_inputs_runs_in_batches_and_bounds_what_a_metric_keeps(tmp_path, monkeypatch):
    from onnx_lowrank import runtime

    pool = np.concatenate([np.load("models/digits_train.npz")["input"], np.load("models/digits_test.npz")["input"]])
    np.savez(tmp_path / "eval.npz", input=pool[:512])
    sizes = []
    original_run = runtime.Session.run

    def counting_run(self, names, feed, what=None):
        sizes.append(len(next(iter(feed.values()))))
        return original_run(self, names, feed, what)

    monkeypatch.setattr(runtime.Session, "run", counting_run)
    settings = Settings(rank_ratio=0.5, eval=str(tmp_path / "eval.npz"), batch_size=64, latency=False,
                        data_aware=False, metric="top1")
    result = api.compress("models/digits_cnn.onnx", None, settings)
    assert (result.validation.inputs, result.validation.batches) == (512, 8)
    assert max(sizes) == 64
    # The outputs a metric keeps count against --max-memory: 512 x 10 logits x 2 models fit 4 MB, not 16 KB.
    with pytest.raises(InputError, match="the task metric keeps every output"):
        api.compress("models/digits_cnn.onnx", None, Settings(**{**settings.__dict__, "max_memory": "40K"}))
