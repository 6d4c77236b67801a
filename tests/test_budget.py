"""Global budgets, --method auto, the error guard, reports and determinism, through the CLI.

MACs are counted in the OUTPUT FILE with the cost model, never taken from the report.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model
from onnx_lowrank import api
from onnx_lowrank.cli import main
from onnx_lowrank.report import validate_report

DIGITS = "models/digits_cnn.onnx"
DIGITS_TEST = ["--calib", "models/digits_test.npz", "--batch-size", "60", "--calib-count", "120"]


def macs_of(path) -> int:
    return api.inspect(str(path)).totals["macs"]


def compress_json(capsys, *args) -> dict:
    code = main(["compress", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def conv_stack(rng, channels=(16, 64, 64, 64, 48), spatial=12, low_rank_layer=None):
    """Conv+Relu layers; the layer `low_rank_layer` gets a rank-4 (near-low-rank) kernel."""
    nodes, inits = [], []
    current = "x"
    for index, (s, t) in enumerate(zip(channels[:-1], channels[1:])):
        weight = rng.standard_normal((t, s, 3, 3))
        if index == low_rank_layer:
            weight = (rng.standard_normal((t, 4)) @ rng.standard_normal((4, s * 9))).reshape(t, s, 3, 3)
            weight += 0.01 * rng.standard_normal(weight.shape)
        inits.append(numpy_helper.from_array((weight / np.sqrt(s * 9)).astype(np.float32), f"w{index}"))
        nodes.append(helper.make_node("Conv", [current, f"w{index}"], [f"c{index}"], name=f"conv{index}",
                                      pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        current = f"r{index}"
    nodes[-1].output[0] = "y"
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels[0], spatial, spatial])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


@pytest.mark.parametrize("target", [0.9, 0.7, 0.5, 0.3])
def test_digits_target_macs_within_two_percent(tmp_path, capsys, target):
    output = tmp_path / "out.onnx"
    report = compress_json(capsys, DIGITS, "-o", str(output), "--target-macs", str(target), "--method", "auto",
                           *DIGITS_TEST, "--no-latency")
    kept = macs_of(output) / macs_of(DIGITS)
    assert abs(kept - target) <= 0.02
    assert report["totals"]["macs_after"] == macs_of(output)


@pytest.mark.parametrize("method,target", [("tucker2", 0.5), ("svd", 0.3), ("auto", 0.7)])
def test_generated_model_target_macs(tmp_path, capsys, rng, method, target):
    source = tmp_path / "stack.onnx"
    onnx.save(conv_stack(rng), str(source))
    output = tmp_path / "out.onnx"
    compress_json(capsys, str(source), "-o", str(output), "--target-macs", str(target), "--method", method,
                  "--no-validate", "--rank-multiple", "8")
    assert abs(macs_of(output) / macs_of(source) - target) <= 0.02


def test_target_params(tmp_path, capsys):
    output = tmp_path / "out.onnx"
    report = compress_json(capsys, DIGITS, "-o", str(output), "--target-params", "0.5", "--no-validate")
    assert abs(report["totals"]["params_after"] / report["totals"]["params_before"] - 0.5) <= 0.02
    assert report["totals"]["params_after"] == api.inspect(str(output)).totals["params"]


def test_unreachable_target_exits_2_with_lowest_reachable(tmp_path, capsys):
    code = main(["compress", DIGITS, "-o", str(tmp_path / "out.onnx"), "--target-macs", "0.01", "--no-validate"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "unreachable" in err and "lowest reachable is 0." in err
    assert not (tmp_path / "out.onnx").exists()


def test_allocator_compresses_the_near_low_rank_layer_more(tmp_path, capsys, rng):
    source = tmp_path / "stack.onnx"
    onnx.save(conv_stack(rng, channels=(16, 64, 64, 64), low_rank_layer=1), str(source))
    report = compress_json(capsys, str(source), "-o", str(tmp_path / "out.onnx"), "--target-macs", "0.6",
                           "--method", "svd", "--no-validate", "--rank-multiple", "4")
    ranks = {layer["name"]: (layer["ranks"] or [64])[0] if layer["status"] == "rewritten" else 64
             for layer in report["layers"]}
    assert ranks["conv1"] < ranks["conv2"]
    assert ranks["conv1"] <= 8


def test_guard_rolls_back_a_too_low_rank_layer(tmp_path, capsys):
    report = compress_json(capsys, DIGITS, "-o", str(tmp_path / "out.onnx"), "--rank-ratio", "0.5",
                           "--max-error", "0.3", *DIGITS_TEST, "--no-latency", "--no-data-aware")
    layers = {layer["name"]: layer for layer in report["layers"]}
    fc2 = layers["/fc2/Gemm"]  # rank 5 of 10 classes: far over the bound
    assert fc2["status"] == "rolled_back" and "--max-error" in fc2["reason"]
    assert fc2["output_rel_error"] > 0.3 and fc2["macs_after"] == fc2["macs_before"]
    assert all(layer["output_rel_error"] <= 0.3 for layer in report["layers"] if layer["status"] == "rewritten")


def test_end_to_end_bound_holds_after_rollback(tmp_path, capsys):
    report = compress_json(capsys, DIGITS, "-o", str(tmp_path / "out.onnx"), "--rank-ratio", "0.25",
                           "--min-cosine", "0.99", *DIGITS_TEST, "--no-latency", "--no-data-aware")
    assert min(o["cosine"] for o in report["validation"]["outputs"]) >= 0.99
    assert any(layer["status"] == "rolled_back" for layer in report["layers"])


def test_report_folder(tmp_path, capsys):
    folder = tmp_path / "report"
    compress_json(capsys, DIGITS, "-o", str(tmp_path / "out.onnx"), "--target-macs", "0.5",
                  *DIGITS_TEST, "--report", str(folder))
    report = json.loads((folder / "report.json").read_text())
    validate_report(report)
    assert report["validation"]["latency_ms"]["before"]["median"] > 0
    for name in ("macs_per_layer.png", "spectra.png", "error_vs_rank.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    assert "/conv2/Conv" in (folder / "report.md").read_text()


@pytest.mark.parametrize("method", ["tucker2", "cp"])
def test_same_input_and_settings_give_identical_bytes(tmp_path, capsys, method):
    outputs = []
    for index, jobs in enumerate(("1", "2")):
        output = tmp_path / f"out{index}.onnx"
        compress_json(capsys, DIGITS, "-o", str(output), "--method", method, "--rank-ratio", "0.5",
                      "--seed", "3", "--jobs", jobs, "--no-validate")
        outputs.append(output.read_bytes())
    assert outputs[0] == outputs[1]


def test_config_file_sets_the_pipeline(tmp_path, capsys):
    config = tmp_path / "settings.toml"
    config.write_text('method = "svd"\ntarget_macs = 0.5\nvalidate = false\n')
    report = compress_json(capsys, DIGITS, "-o", str(tmp_path / "out.onnx"), "--config", str(config))
    assert {layer["method"] for layer in report["layers"] if layer["status"] == "rewritten"} == {"svd"}
    assert report["settings"]["target_macs"] == 0.5


def test_a_budget_over_layers_of_unknown_shape_is_refused_in_one_line(tmp_path, capsys):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from conftest import make_model
    from onnx_lowrank.cli import main

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["z"], name="inner")], "branch", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [weight])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    # The input's shape is unknown, so is the layer's in the branch: its cost is not countable.
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(model, tmp_path / "if.onnx")
    code = main(["compress", str(tmp_path / "if.onnx"), "-o", str(tmp_path / "out.onnx"), "--method", "auto",
                 "--target-macs", "0.5", "--no-validate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no MACs to budget" in err[-1]
