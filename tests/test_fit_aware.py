"""The fit-aware budget (`--fit-aware-budget`): re-allocation on curves measured after the fit."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import make_model, prepared
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import api, calibrate
from onnx_lowrank.config import Settings
from onnx_lowrank.methods import MethodSet
from onnx_lowrank.passes import BudgetPass, FitAwareBudgetPass, default_pipeline


def linear_chain(rng, width=32, layers=2, spatial=8) -> onnx.ModelProto:
    """1x1 convs one after the other, no activation between them (full-rank random weights)."""
    nodes, inits, current = [], [], "x"
    for index in range(layers):
        weight = rng.standard_normal((width, width, 1, 1)) / np.sqrt(width)
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"w{index}"))
        nodes.append(helper.make_node("Conv", [current, f"w{index}"], [f"c{index}"], name=f"conv{index}"))
        current = f"c{index}"
    nodes[-1].output[0] = "y"
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width, spatial, spatial])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def compressed_ranks(tmp_path, rng, **settings) -> dict[str, tuple]:
    source, calib = tmp_path / "chain.onnx", tmp_path / "calib.npz"
    onnx.save(linear_chain(rng), str(source))
    np.savez(calib, x=rng.standard_normal((64, 32, 8, 8)).astype(np.float32))
    result = api.compress(str(source), str(tmp_path / "out.onnx"),
                          Settings(method="svd", target_macs=0.5, calib=str(calib), batch_size=16, rank_multiple=4,
                                   validate=False, **settings))
    return {layer.name: layer.ranks for layer in result.layers}


def test_reallocation_follows_the_curve_the_fit_sees(tmp_path):
    """conv1 reads conv0's output: with conv0 at rank r its input spans r dimensions, so the
    sequential fit of conv1 loses nothing above rank r (its paired spectrum has r non-zero values)
    while the closed-form curve, on the original inputs, charges every rank below 32. The two
    layers are alike, so the plain budget splits evenly; the curves measured after the fit move
    rank from conv1 to conv0."""
    plain = compressed_ranks(tmp_path, np.random.default_rng(0))
    aware = compressed_ranks(tmp_path, np.random.default_rng(0), fit_aware_budget=True)
    assert plain["conv0"] == plain["conv1"]
    assert aware["conv0"][0] > plain["conv0"][0]
    assert aware["conv1"][0] < plain["conv1"][0]


def test_unchanged_inputs_give_the_closed_form_curve(rng):
    """A layer whose inputs the compressed prefix leaves as they were (p~ = p): its measured curve,
    in units of the original output energy, is the closed-form curve of the data spectra."""
    workspace = prepared(linear_chain(rng, layers=1))
    layer = workspace.layers[0]
    methods = MethodSet(workspace.settings)
    method = methods.serving("svd", layer)
    xs = [rng.standard_normal((16, 32, 8, 8)).astype(np.float32)]
    workspace.spectra[layer.name] = {method.name: method.spectra(layer, calibrate.layer_moments(layer, xs, None))}
    budget = BudgetPass(methods, 0.5, "macs", ("svd",), multiple=4)
    measured = FitAwareBudgetPass(budget, None)._curves(layer, xs, [x.copy() for x in xs], workspace)[method.name]
    expected = method.error_curve(layer, workspace.spectra[layer.name][method.name], 4)
    assert [ranks for ranks, _ in measured] == [ranks for ranks, _ in expected]
    np.testing.assert_allclose([e for _, e in measured], [e for _, e in expected], rtol=1e-6, atol=1e-9)


def test_the_flag_off_leaves_the_pipeline_as_it_was(tmp_path):
    """Off (the default), or on without calibration data, the budget is the plain `BudgetPass`."""
    calib = str(tmp_path / "calib.npz")
    base = {"method": "auto", "target_macs": 0.5, "calib": calib}
    assert Settings().fit_aware_budget is False
    off = default_pipeline(Settings(**base))
    assert type(off.passes[off.names.index("allocate")]) is BudgetPass
    assert "fit-aware allocate" not in off.names
    on = default_pipeline(Settings(**base, fit_aware_budget=True))
    assert "allocate" not in on.names and "fit-aware allocate" in on.names
    no_data = default_pipeline(Settings(method="auto", target_macs=0.5, fit_aware_budget=True))
    assert "fit-aware allocate" not in no_data.names
