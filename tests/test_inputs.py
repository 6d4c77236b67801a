"""Tests for onnx_lowrank.inputs: specs, pinned shapes, random feeds, calibration data."""

import logging
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.errors import InputError
from onnx_lowrank.images import ImageOptions
from onnx_lowrank.inputs import (
    InputSpec,
    input_specs,
    load_calibration,
    parse_input_shapes,
    random_feeds,
    resolve_shapes,
)


def _model(inputs, initializers=(), extra_graph_inputs=()):
    """A model whose graph only declares ``inputs`` (name, elem_type, shape); output = first."""
    values = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    values += list(extra_graph_inputs)
    first = inputs[0]
    graph = helper.make_graph(
        [helper.make_node("Identity", [first[0]], ["out"])],
        "g",
        values,
        [helper.make_tensor_value_info("out", first[1], first[2])],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _specs(*inputs):
    return input_specs(_model(list(inputs)))


# ------------------------------------------------------------------ specs and shapes


def test_input_specs_excludes_initializers_and_reads_dims():
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    model = _model(
        [("x", TensorProto.FLOAT, ["batch", 3, None]), ("ids", TensorProto.INT64, [4])],
        initializers=[weight],
        extra_graph_inputs=[helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2])],
    )
    specs = input_specs(model)
    assert [s.name for s in specs] == ["x", "ids"]
    assert specs[0] == InputSpec("x", np.dtype(np.float32), ("batch", 3, None))
    assert specs[1].dtype == np.int64 and specs[1].shape == (4,) and specs[1].is_static
    assert specs[0].shape_str() == "batchx3x?"


def test_input_specs_rejects_non_tensor_input():
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    model = _model([("x", TensorProto.FLOAT, [1])], extra_graph_inputs=[seq])
    with pytest.raises(InputError, match="'s' is a sequence_type"):
        input_specs(model)


def test_parse_input_shapes():
    assert parse_input_shapes(["x:1x3x224x224", "input:0:2,5", " y : 7 "]) == {
        "x": (1, 3, 224, 224),
        "input:0": (2, 5),
        "y": (7,),
    }
    assert parse_input_shapes(None) == {}


@pytest.mark.parametrize(
    "bad, message",
    [
        ("x", "expected NAME:DIMS"),
        (":1x3", "expected NAME:DIMS"),
        ("x:", "expected NAME:DIMS"),
        ("x:1xax3", "positive integers"),
        ("x:1x0", "must be positive"),
    ],
)
def test_parse_input_shapes_bad_syntax(bad, message):
    with pytest.raises(InputError, match=message):
        parse_input_shapes([bad])


def test_parse_input_shapes_duplicate():
    with pytest.raises(InputError, match="twice"):
        parse_input_shapes(["x:1", "x:2"])


def test_resolve_shapes_defaults_batch_and_uses_pins():
    specs = _specs(
        ("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
        ("m", TensorProto.FLOAT, [None, "T"]),
    )
    shapes = resolve_shapes(specs, {"m": (2, 5)})
    assert shapes == {"x": (1, 3, 8, 8), "m": (2, 5)}


def test_resolve_shapes_unknown_name():
    specs = _specs(("a", TensorProto.FLOAT, [1]), ("b", TensorProto.FLOAT, [1]))
    with pytest.raises(
        InputError, match=r"unknown input name 'foo' in --input-shape; the model's inputs are: a, b"
    ):
        resolve_shapes(specs, {"foo": (1,)})


def test_resolve_shapes_rank_and_fixed_dim_mismatch():
    specs = _specs(("x", TensorProto.FLOAT, ["N", 3, 8, 8]))
    with pytest.raises(InputError, match="gives 3 dims"):
        resolve_shapes(specs, {"x": (1, 3, 8)})
    with pytest.raises(InputError, match="fixes dimension 1 to 3"):
        resolve_shapes(specs, {"x": (1, 4, 8, 8)})


def test_resolve_shapes_dynamic_non_batch_dim():
    specs = _specs(("tokens", TensorProto.INT64, ["batch", "seq"]))
    with pytest.raises(InputError, match=r"dynamic dimension 1 \('seq'.*--input-shape tokens:1xN"):
        resolve_shapes(specs)


# ------------------------------------------------------------------ random feeds


def test_random_feeds_dtypes_ranges_and_determinism():
    specs = _specs(
        ("f", TensorProto.FLOAT, [2, 3]),
        ("h", TensorProto.FLOAT16, [4]),
        ("i", TensorProto.INT64, [50]),
        ("b", TensorProto.BOOL, [6]),
    )
    shapes = resolve_shapes(specs)
    feeds = random_feeds(specs, shapes, count=3, seed=7)
    assert len(feeds) == 3
    f = feeds[0]
    assert f["f"].dtype == np.float32 and f["f"].shape == (2, 3)
    assert f["h"].dtype == np.float16
    assert f["i"].dtype == np.int64 and f["i"].min() >= 0 and f["i"].max() < 2
    assert f["b"].dtype == np.bool_
    again = random_feeds(specs, shapes, count=3, seed=7)
    for a, b in zip(feeds, again, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = random_feeds(specs, shapes, count=1, seed=8)
    assert not np.array_equal(other[0]["f"], feeds[0]["f"])
    # Different samples differ.
    assert not np.array_equal(feeds[0]["f"], feeds[1]["f"])


def test_random_feeds_standard_normal():
    specs = _specs(("x", TensorProto.FLOAT, [20000]))
    x = random_feeds(specs, {"x": (20000,)}, count=1)[0]["x"]
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05


def test_random_feeds_bad_count_and_string():
    specs = _specs(("x", TensorProto.FLOAT, [2]))
    with pytest.raises(InputError, match="at least 1"):
        random_feeds(specs, {"x": (2,)}, count=0)
    strings = [InputSpec("s", np.dtype(object), (2,))]
    with pytest.raises(InputError, match="--calib"):
        random_feeds(strings, {"s": (2,)}, count=1)


# ------------------------------------------------------------------ npz


def test_npz_batches_fixed_batch_drops_remainder(tmp_path, caplog):
    specs = _specs(("x", TensorProto.FLOAT, [4, 3]), ("ids", TensorProto.INT64, [4]))
    data = np.arange(10 * 3, dtype=np.float64).reshape(10, 3)
    ids = np.arange(10, dtype=np.int32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=data, ids=ids, label=np.zeros(10))
    with caplog.at_level(logging.INFO, logger="onnx_lowrank.inputs"):
        feeds = load_calibration(path, specs)
    assert "label" in caplog.text  # the extra key is ignored, and said so
    assert "dropping the last 2" in caplog.text
    assert len(feeds) == 2
    assert feeds[0]["x"].dtype == np.float32 and feeds[0]["ids"].dtype == np.int64
    np.testing.assert_array_equal(feeds[1]["x"], data[4:8].astype(np.float32))
    np.testing.assert_array_equal(feeds[1]["ids"], ids[4:8])


def test_npz_dynamic_batch_defaults_to_one_and_settable(tmp_path):
    specs = _specs(("x", TensorProto.FLOAT, ["N", 2]))
    data = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
    path = tmp_path / "c.npz"
    np.savez(path, x=data)
    feeds = load_calibration(path, specs)
    assert len(feeds) == 5 and feeds[3]["x"].shape == (1, 2)
    np.testing.assert_array_equal(feeds[3]["x"], data[3:4])
    feeds = load_calibration(path, specs, batch_size=2)
    assert [f["x"].shape[0] for f in feeds] == [2, 2, 1]  # a free batch dim runs the rest
    feeds = load_calibration(path, specs, shapes={"x": (2, 2)})
    assert [f["x"].shape[0] for f in feeds] == [2, 2]  # a pinned batch is kept fixed
    feeds = load_calibration(path, specs, count=3, batch_size=3)
    assert len(feeds) == 1
    np.testing.assert_array_equal(feeds[0]["x"], data[:3])


def test_npz_dynamic_inner_dims_free(tmp_path):
    specs = _specs(("tokens", TensorProto.INT64, ["N", "T"]))
    path = tmp_path / "c.npz"
    np.savez(path, tokens=np.ones((2, 7), np.int64))
    feeds = load_calibration(path, specs)
    assert feeds[0]["tokens"].shape == (1, 7)


def test_npz_errors(tmp_path):
    specs = _specs(("x", TensorProto.FLOAT, [1, 3]), ("y", TensorProto.FLOAT, [1, 2]))
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((2, 3)))
    with pytest.raises(InputError, match=r"no array for graph input\(s\) y; it has: x"):
        load_calibration(path, specs)
    np.savez(path, x=np.zeros((2, 4)), y=np.zeros((2, 2)))
    with pytest.raises(InputError, match="axis 1 should be 3"):
        load_calibration(path, specs)
    np.savez(path, x=np.zeros((2, 3)), y=np.zeros((3, 2)))
    with pytest.raises(InputError, match="different sample counts"):
        load_calibration(path, specs)
    np.savez(path, x=np.zeros(3), y=np.zeros((2, 2)))
    with pytest.raises(InputError, match="expected 2 axes"):
        load_calibration(path, specs)
    with pytest.raises(InputError, match="missing.npz: no such file or folder"):
        load_calibration(tmp_path / "missing.npz", specs)
    other = tmp_path / "c.npy"
    np.save(other, np.zeros(3))
    with pytest.raises(InputError, match="must be an .npz file or a folder"):
        load_calibration(other, specs)
    with pytest.raises(InputError, match="unknown input name"):
        load_calibration(path, specs, shapes={"z": (1,)})


def test_npz_too_few_samples_for_fixed_batch(tmp_path):
    specs = _specs(("x", TensorProto.FLOAT, [4, 3]))
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((3, 3)))
    with pytest.raises(InputError, match="3 sample.*batch size is 4"):
        load_calibration(path, specs)
    with pytest.raises(InputError, match="batch dimension 4"):
        load_calibration(path, specs, batch_size=2)


@pytest.mark.parametrize("content", [b"not a zip file at all", b"PK\x03\x04garbage"])
def test_npz_corrupt(tmp_path, content):
    specs = _specs(("x", TensorProto.FLOAT, [1, 3]))
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(InputError, match="cannot read calibration file"):
        load_calibration(path, specs)


def test_npz_truncated(tmp_path):
    specs = _specs(("x", TensorProto.FLOAT, [1, 3]))
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 3)))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(InputError, match="cannot read"):
        load_calibration(bad, specs)


# ------------------------------------------------------------------ images


def _write_images(folder, count=3, size=(8, 8), mode="RGB"):
    """PNGs with known pixels: pixel[y, x, c] = (10*i + 3*y + 5*x + 40*c) % 256."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    arrays = []
    w, h = size
    for i in range(count):
        y, x, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
        arr = ((10 * i + 3 * y + 5 * x + 40 * c) % 256).astype(np.uint8)
        Image.fromarray(arr, mode="RGB").save(folder / f"img{i}.png")
        arrays.append(arr)
    return arrays


def test_image_folder_nchw_mean_std(tmp_path):
    arrays = _write_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    specs = _specs(("img", TensorProto.FLOAT, ["N", 3, 8, 8]))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    feeds = load_calibration(
        tmp_path / "imgs", specs, image_options=ImageOptions(mean=mean, std=std)
    )
    assert len(feeds) == 3
    for feed, arr in zip(feeds, arrays, strict=True):
        got = feed["img"]
        assert got.shape == (1, 3, 8, 8) and got.dtype == np.float32
        want = (arr.astype(np.float32) / 255 - np.array(mean, np.float32)) / np.array(
            std, np.float32
        )
        np.testing.assert_allclose(got[0], want.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)


def test_image_folder_nhwc_bgr_batched(tmp_path):
    arrays = _write_images(tmp_path / "imgs")
    specs = _specs(("img", TensorProto.FLOAT, [None, 8, 8, 3]))
    options = ImageOptions(mean=(0.1, 0.2, 0.3), std=(0.5,), channel_order="BGR")
    feeds = load_calibration(tmp_path / "imgs", specs, batch_size=3, image_options=options)
    assert len(feeds) == 1 and feeds[0]["img"].shape == (3, 8, 8, 3)
    for got, arr in zip(feeds[0]["img"], arrays, strict=True):
        want = (
            arr[..., ::-1].astype(np.float32) / 255 - np.array([0.1, 0.2, 0.3], np.float32)
        ) / 0.5
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_image_folder_centre_crop_and_grayscale(tmp_path):
    arrays = _write_images(tmp_path / "imgs", count=2, size=(12, 8))  # 12 wide, 8 high
    specs = _specs(("img", TensorProto.FLOAT, [1, 3, 8, 8]))
    feeds = load_calibration(tmp_path / "imgs", specs)
    # The short side is already 8: no resize, columns 2..9 are kept.
    np.testing.assert_allclose(
        feeds[1]["img"][0], arrays[1][:, 2:10].transpose(2, 0, 1) / 255, atol=1e-6
    )
    gray = _specs(("img", TensorProto.FLOAT, [1, 1, 8, 8]))
    feeds = load_calibration(tmp_path / "imgs", gray, count=1)
    assert len(feeds) == 1 and feeds[0]["img"].shape == (1, 1, 8, 8)
    from PIL import Image

    with Image.open(tmp_path / "imgs" / "img0.png") as im:
        want = np.asarray(im.convert("L"), np.float32)[:, 2:10] / 255
    np.testing.assert_allclose(feeds[0]["img"][0, 0], want, atol=1e-6)


def test_image_folder_resizes_short_side(tmp_path):
    _write_images(tmp_path / "imgs", count=1, size=(32, 16))
    specs = _specs(("img", TensorProto.FLOAT, [1, 3, 4, 4]))
    feeds = load_calibration(tmp_path / "imgs", specs, image_options=ImageOptions(resize=6))
    assert feeds[0]["img"].shape == (1, 3, 4, 4)
    assert 0.0 <= feeds[0]["img"].min() and feeds[0]["img"].max() <= 1.0


def test_image_folder_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    specs = _specs(("img", TensorProto.FLOAT, [1, 3, 8, 8]))
    with pytest.raises(InputError, match="no images"):
        load_calibration(empty, specs)
    _write_images(tmp_path / "imgs", count=1)
    two = _specs(("a", TensorProto.FLOAT, [1, 3, 8, 8]), ("b", TensorProto.FLOAT, [1, 3, 8, 8]))
    with pytest.raises(InputError, match="exactly one 4-D image input"):
        load_calibration(tmp_path / "imgs", two)
    with pytest.raises(InputError, match="cannot tell the image layout"):
        load_calibration(tmp_path / "imgs", _specs(("img", TensorProto.FLOAT, [1, 5, 8, 7])))
    with pytest.raises(InputError, match="dynamic image size.*--input-shape img:1x3x224x224"):
        load_calibration(tmp_path / "imgs", _specs(("img", TensorProto.FLOAT, [1, 3, "H", "W"])))
    with pytest.raises(InputError, match="image mean has 2 values"):
        load_calibration(tmp_path / "imgs", specs, image_options=ImageOptions(mean=(0.1, 0.2)))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="cannot read image"):
        load_calibration(tmp_path / "imgs", specs)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(
        InputError, match="reading an image folder needs pillow: pip install pillow"
    ):
        load_calibration(tmp_path / "imgs", specs)


def test_image_options_validation():
    with pytest.raises(InputError, match="layout"):
        ImageOptions(layout="CHW")
    with pytest.raises(InputError, match="channel order"):
        ImageOptions(channel_order="RGBA")
    with pytest.raises(InputError, match="std"):
        ImageOptions(std=(1.0, 0.0, 1.0))
    assert ImageOptions(layout="nhwc").layout == "NHWC"


def test_image_folder_pinned_dynamic_size(tmp_path):
    _write_images(tmp_path / "imgs", count=1, size=(8, 8))
    specs = _specs(("img", TensorProto.FLOAT, ["N", 3, "H", "W"]))
    feeds = load_calibration(tmp_path / "imgs", specs, shapes={"img": (1, 3, 6, 6)})
    assert feeds[0]["img"].shape == (1, 3, 6, 6)


def test_model_roundtrip_specs_from_file(tmp_path):
    model = _model([("x", TensorProto.FLOAT, ["N", 4])])
    onnx.save(model, tmp_path / "m.onnx")
    assert input_specs(onnx.load(tmp_path / "m.onnx"))[0].shape == ("N", 4)
