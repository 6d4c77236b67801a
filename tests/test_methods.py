"""Methods as objects: the built-in tuple, a third-party method end to end, numerical failures."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import assert_numerically_equal, conv_model, fit, prepared
from onnx_lowrank import Settings, api, register_method
from onnx_lowrank.factorize import NumericalError
from onnx_lowrank.methods import BUILTIN_METHODS, auto_candidates, available, method_names
from onnx_lowrank.methods.svd import ChannelSVD
from onnx_lowrank.ranks import FixedRank, RankRatio

PLUGINS = pathlib.Path(__file__).parent / "plugins"
DIGITS = "models/digits_cnn.onnx"
sys.path.insert(0, str(PLUGINS))

from toy_methods import InputTucker1  # noqa: E402


def test_the_cli_choices_and_auto_derive_from_the_tuple():
    from onnx_lowrank.cli import build_parser

    names = tuple(m.name for m in BUILTIN_METHODS)
    assert method_names()[:len(names)] == names
    assert set(auto_candidates()) == {m.name for m in BUILTIN_METHODS if m.in_auto}
    compress = next(a for a in build_parser()._subparsers._group_actions[0].choices["compress"]._actions
                    if a.dest == "method")
    assert set(compress.choices) == {*method_names(), "auto"}


def test_a_method_defined_outside_the_package_runs_end_to_end(tmp_path, rng):
    register_method(InputTucker1)
    assert "tucker1-in" in available()
    # A kernel of input-mode rank 3 is reproduced at rank 3 (half of its 6 input channels).
    weight = np.einsum("tri,rs->tsi", rng.standard_normal((8, 3, 9)), rng.standard_normal((3, 6))).reshape(8, 6, 3, 3)
    model = conv_model((2, 6, 9, 9), weight, rng.standard_normal(8), pads=[1, 1, 1, 1], strides=[2, 2])
    exact = api.compress(model, tmp_path / "full.onnx", Settings(method="tucker1-in", rank_ratio=0.5,
                                                                 validate=False))
    assert [layer.status for layer in exact.layers] == ["rewritten"]
    assert_numerically_equal(model, onnx.load(str(tmp_path / "full.onnx")),
                             {"x": rng.standard_normal((2, 6, 9, 9)).astype(np.float32)})
    # Budgets, data-aware fitting (the refit is the package's) and the report work for it as well.
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.load("models/digits_test.npz")["input"][:64])
    result = api.compress(DIGITS, tmp_path / "small.onnx",
                          Settings(method="tucker1-in", target_macs=0.6, rank_multiple=4, calib=str(calib),
                                   calib_count=64, validate=False, report=str(tmp_path / "report")))
    convs = [layer for layer in result.layers if layer.op == "Conv" and layer.status == "rewritten"]
    assert convs and all(layer.method == "tucker1-in" for layer in convs)
    assert abs(result.totals_after["macs"] / result.totals_before["macs"] - 0.6) <= 0.02
    assert (tmp_path / "report" / "report.json").exists()


def test_an_entry_point_makes_a_method_available_to_the_cli(tmp_path):
    dist = tmp_path / "toy_methods-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-methods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[onnx_lowrank.methods]\ntucker1-in = toy_methods:InputTucker1\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(PLUGINS), os.getcwd()]))
    done = subprocess.run([sys.executable, "-m", "onnx_lowrank", "compress", DIGITS, "-o", str(tmp_path / "o.onnx"),
                           "--method", "tucker1-in", "--no-validate", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"method": "tucker1-in"' in done.stdout


def test_a_numerical_failure_skips_the_layer_with_its_reason(rng, monkeypatch):
    layer = prepared(conv_model((1, 4, 6, 6), rng.standard_normal((6, 4, 3, 3)))).layers[0]

    def failing(self, *args):
        raise NumericalError("the second-moment matrix is not numerically positive definite")

    monkeypatch.setattr(ChannelSVD, "factor_kernel", failing)
    plan = fit(layer, "svd", FixedRank(2))
    assert plan.chain is None and plan.skip_reason.startswith("svd failed numerically: the second-moment")


def test_any_other_error_of_a_method_is_not_taken_for_a_skip(rng, monkeypatch):
    layer = prepared(conv_model((1, 4, 6, 6), rng.standard_normal((6, 4, 3, 3)))).layers[0]

    def broken(self, *args):
        raise ValueError("a bug")

    monkeypatch.setattr(ChannelSVD, "factor_kernel", broken)
    with pytest.raises(ValueError, match="a bug"):
        fit(layer, "svd", RankRatio(0.5))


def test_versatile_layers_count_their_bias_once(tmp_path):
    result = api.compress(DIGITS, tmp_path / "v.onnx", Settings(method="versatile", validate=False))
    rewritten = [layer for layer in result.layers if layer.status == "rewritten"]
    assert rewritten
    total_params = result.totals_after["params"]
    others = sum(layer.params_after for layer in result.layers if layer.status != "rewritten")
    assert sum(layer.params_after for layer in rewritten) + others == total_params
