"""Model I/O: round trip, external data, IR version the runtime accepts, atomic writes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import conv_model, run
from onnx_lowrank import model as model_io
from onnx_lowrank.errors import InputError
from onnx_lowrank.runtime import runtime_max_ir_version


def test_round_trip_keeps_outputs_names_and_metadata(tmp_path, rng):
    original = conv_model((1, 3, 6, 6), rng.standard_normal((4, 3, 3, 3)), pads=[1, 1, 1, 1])
    original.metadata_props.add(key="author", value="test")
    original.doc_string = "doc"
    path = model_io.save_model(original, tmp_path / "m.onnx")
    loaded = model_io.load_model(path)
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_array_equal(run(original, feed)[0], run(loaded, feed)[0])
    assert [p.key for p in loaded.metadata_props] == ["author"]
    assert loaded.opset_import == original.opset_import
    assert [i.name for i in loaded.graph.input] == ["x"]
    assert [o.name for o in loaded.graph.output] == ["y"]


def test_newest_ir_version_is_lowered_to_what_onnxruntime_accepts(tmp_path, rng):
    newest = conv_model((1, 3, 6, 6), rng.standard_normal((4, 3, 3, 3)))
    newest.ir_version = onnx.IR_VERSION
    saved = model_io.load_model(model_io.save_model(newest, tmp_path / "m.onnx"))
    assert saved.ir_version == min(onnx.IR_VERSION, runtime_max_ir_version())
    run(saved, {"x": np.zeros((1, 3, 6, 6), np.float32)})


def test_external_data_is_loaded(tmp_path, rng):
    original = conv_model((1, 3, 6, 6), rng.standard_normal((16, 3, 3, 3)))
    onnx.save_model(onnx.ModelProto.FromString(original.SerializeToString()), str(tmp_path / "ext.onnx"),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").exists()
    loaded = model_io.load_model(tmp_path / "ext.onnx")
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_array_equal(run(original, feed)[0], run(loaded, feed)[0])


def test_large_models_are_saved_with_external_data(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    original = conv_model((1, 3, 6, 6), rng.standard_normal((16, 3, 3, 3)))
    model_io.save_model(original, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size >= 16 * 3 * 9 * 4
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    loaded = model_io.load_model(tmp_path / "big.onnx")
    np.testing.assert_array_equal(run(original, feed)[0], run(loaded, feed)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]


@pytest.mark.parametrize("content,message", [
    (None, "no such file"), (b"", "empty"), (b"not a model at all", "not a readable ONNX model")])
def test_bad_files_raise_input_error(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        model_io.load_model(path)


def test_truncated_file_is_bad_input(tmp_path):
    data = onnx.load("models/digits_cnn.onnx").SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        model_io.load_model(tmp_path / "cut.onnx")


def test_failed_save_leaves_no_file(tmp_path, rng, monkeypatch):
    original = conv_model((1, 3, 6, 6), rng.standard_normal((4, 3, 3, 3)))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", broken)
    with pytest.raises(OSError):
        model_io.save_model(original, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
