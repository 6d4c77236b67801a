"""Output gains measured with each layer's truncation error (`--gain-noise truncation`)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from conftest import prepared, run
from onnx_lowrank import calibrate, truncation
from onnx_lowrank.config import Settings
from onnx_lowrank.errors import InputError
from onnx_lowrank.passes import OutputGainsPass, SharedStatistics
from test_calibrate import two_matmul_model

#: The energies of h's channels: mm1 passes only the four weakest, the ones a truncation drops.
SCALES = np.array([10.0, 8.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0])


def killing_model(rng):
    """x -> mm0 -> h -> mm1 -> y: h's second moments are diag(SCALES²) exactly, and mm1 keeps
    only h's last four channels (rotated), the trailing directions of mm0's output."""
    rotation = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    second = np.zeros((8, 8))
    second[4:, 4:] = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    samples = np.linalg.qr(rng.standard_normal((64, 8)))[0] * 8
    feeds = [{"x": (samples * SCALES @ rotation.T).astype(np.float32)}]
    return two_matmul_model(rotation, second), feeds


def truncated(model, feeds, rank):
    """The model with mm0's weight truncated to `rank` the data-aware way (``U_r U_rᵀ`` of its
    outputs' second moments applied after it), and its relative squared output error."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    h = feeds[0]["x"].astype(np.float64) @ weights["w0"]
    basis = np.linalg.eigh(h.T @ h)[1][:, ::-1][:, :rank]
    changed = model.__deepcopy__()
    for tensor in changed.graph.initializer:
        if tensor.name == "w0":
            tensor.CopyFrom(numpy_helper.from_array((weights["w0"] @ basis @ basis.T).astype(np.float32), "w0"))
    layer_error = np.sum((h - h @ basis @ basis.T) ** 2) / np.sum(h ** 2)
    out, = run(model, feeds[0])
    cut, = run(changed, feeds[0])
    return float(np.sum((cut - out) ** 2) / np.sum(out ** 2)), float(layer_error)


def test_truncation_gain_predicts_a_truncated_layer_where_white_noise_does_not(rng):
    # White noise on h loses half its energy in mm1, so its gain is |h|² / (2 |h_4:|²) = 25; a
    # truncation of mm0 drops only h's weak channels, all of which mm1 passes. At the rank
    # keeping half of mm0's MACs (2 of 8), the truncation gain times the layer's error is the
    # model's error exactly; at rank 3 it is still far closer than the white gain.
    model, feeds = killing_model(rng)
    workspace = prepared(model)
    layers = [layer for layer in workspace.layers if layer.name == "mm0"]
    assert truncation.representative_rank(layers[0], 8) == 2
    white = calibrate.output_gains(workspace.canonical, layers, feeds)["mm0"]
    shaped = calibrate.output_gains(workspace.canonical, layers, feeds, noise="truncation")["mm0"]
    assert white == pytest.approx(25, rel=0.5)
    for rank in (2, 3):
        real, layer_error = truncated(model, feeds, rank)
        assert real == pytest.approx(1.0, rel=1e-3)
        white_ratio, shaped_ratio = real / (white * layer_error), real / (shaped * layer_error)
        assert abs(np.log(shaped_ratio)) < abs(np.log(white_ratio)) - 0.3
    assert shaped * truncated(model, feeds, 2)[1] == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("dense", [2048, 2])
def test_truncation_error_is_the_outputs_part_past_the_rank_per_group(rng, monkeypatch, dense):
    # A grouped conv's output: each group's channels get their own leading directions, from the
    # channels' second moments or (past `DENSE_CHANNELS`) from the SVD of the stacked vectors;
    # the error is the output less its projection on them.
    monkeypatch.setattr(truncation, "DENSE_CHANNELS", dense)
    workspace = prepared(_grouped_conv(rng))
    layer = workspace.layers[0]
    signal = rng.standard_normal((2, 8, 5, 5)) * np.array([9, 3, 1, 0.1, 7, 2, 1, 0.5])[None, :, None, None]
    bases = truncation.kept_directions(layer, [signal])
    rank = truncation.representative_rank(layer, 4)
    assert [b.shape for b in bases] == [(4, rank)] * 2
    error = truncation.truncation_error(layer, signal, bases)
    assert error.shape == signal.shape
    for group in range(2):
        vectors = np.moveaxis(signal[:, 4 * group:4 * group + 4], 1, -1).reshape(-1, 4)
        dropped = np.moveaxis(error[:, 4 * group:4 * group + 4], 1, -1).reshape(-1, 4)
        kept = np.linalg.eigh(vectors.T @ vectors)[1][:, ::-1][:, :rank]
        np.testing.assert_allclose(dropped, vectors - vectors @ kept @ kept.T, atol=1e-10)


def _grouped_conv(rng):
    from onnx import TensorProto, helper

    from conftest import make_model

    weight = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=2, pads=[1, 1, 1, 1])
    return make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 5, 5])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])


def test_gain_noise_is_a_setting_and_part_of_the_shared_gains_key(rng):
    # White and truncation gains of one model are measured apart, not read from each other.
    assert Settings().gain_noise == "white"
    with pytest.raises(InputError, match="gain-noise"):
        Settings(gain_noise="pink")
    model, feeds = killing_model(rng)
    shared, gains = SharedStatistics(), {}
    for noise in ("white", "truncation", "white"):
        workspace = prepared(model, gain_noise=noise)
        workspace.calibration = feeds
        OutputGainsPass(shared).run(workspace, lambda items, total, text: items)
        gains.setdefault(noise, workspace.decisions["mm0"].output_gain)
        assert workspace.decisions["mm0"].output_gain == gains[noise]
    assert shared.gain_runs == 2
    assert gains["truncation"] < gains["white"] / 3
