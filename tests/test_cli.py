"""The command line: tables, JSON contracts, exit codes, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from onnx_lowrank.cli import main

DIGITS = "models/digits_cnn.onnx"


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_table_lists_every_layer(capsys):
    code, out, _ = run_cli(capsys, "inspect", DIGITS)
    assert code == 0
    for name in ("/conv1/Conv", "/conv4/Conv", "/fc2/Gemm"):
        assert name in out
    assert "2.39M MACs" in out


def test_inspect_json_contract(capsys):
    code, out, _ = run_cli(capsys, "inspect", DIGITS, "--json")
    report = json.loads(out)
    assert code == 0
    assert set(report) == {"layers", "totals"}
    assert report["totals"]["params"] == 109_770
    assert sum(layer["macs_before"] for layer in report["layers"]) == report["totals"]["macs"]
    assert {"name", "op", "status", "reason", "macs_before", "params_before"} <= set(report["layers"][0])


@pytest.mark.parametrize("make_args,message", [
    (lambda tmp: ["inspect", str(tmp / "missing.onnx")], "no such file"),
    (lambda tmp: ["inspect", str(_write(tmp / "empty.onnx", b""))], "empty"),
    (lambda tmp: ["inspect", str(_write(tmp / "text.onnx", b"hello"))], "not a readable ONNX model"),
    (lambda tmp: ["inspect", str(_truncated(tmp))], "not a readable ONNX model"),
    (lambda tmp: ["inspect", DIGITS, "--input-shape", "nope:1x1x8x8"], "unknown input name"),
    (lambda tmp: ["inspect", DIGITS, "--input-shape", "input:1xAx8"], "input-shape"),
    (lambda tmp: ["inspect", str(_no_layers(tmp))], "no Conv"),
    (lambda tmp: ["compress", str(tmp / "missing.onnx"), "-o", str(tmp / "out.onnx")], "no such file"),
    (lambda tmp: ["compress", DIGITS, "-o", str(tmp / "out.onnx"), "--rank-ratio", "1.5"], "rank-ratio"),
    (lambda tmp: ["compress", DIGITS, "-o", str(tmp / "out.onnx"), "--layers", "("], "regular expression"),
    (lambda tmp: ["compress", DIGITS, "-o", str(tmp / "out.onnx"), "--method", "magic"], "invalid choice"),
    (lambda tmp: ["compress", DIGITS, "-o", DIGITS], "refusing to overwrite"),
    (lambda tmp: ["compress", DIGITS, "-o", str(tmp / "no" / "out.onnx")], "does not exist"),
    (lambda tmp: ["validate", DIGITS, str(tmp / "missing.onnx")], "no such file"),
    (lambda tmp: ["frobnicate"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, make_args, message):
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_cli(capsys, *make_args(tmp_path))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert "Traceback" not in err + out
    created = [p for p in sorted(tmp_path.rglob("*")) if p not in before and p.suffix == ".onnx"]
    assert not [p for p in created if p.name == "out.onnx"]


def _write(path, data):
    path.write_bytes(data)
    return path


def _truncated(tmp):
    data = open(DIGITS, "rb").read()
    return _write(tmp / "cut.onnx", data[: len(data) // 3])


def _no_layers(tmp):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp / "relu.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_console_script_runs_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "onnx_lowrank", "inspect", str(tmp_path / "x.onnx")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_validate_model_against_itself(capsys):
    code, out, _ = run_cli(capsys, "validate", DIGITS, DIGITS, "--calib", "models/digits_test.npz",
                           "--calib-count", "32", "--json", "--no-latency")
    report = json.loads(out)
    assert code == 0
    assert report["outputs"][0]["rel_l2"] == 0.0
    assert report["top1_agreement"] == 1.0
    assert report["provider"] == "CPUExecutionProvider"


@pytest.mark.parametrize("extra, warned", [((), True), (("--eval", "models/digits_test.npz"), False),
                                           (("--no-data-aware",), False)])
def test_compress_says_when_it_validated_on_its_own_calibration_inputs(tmp_path, capsys, extra, warned):
    code, out, _ = run_cli(capsys, "compress", DIGITS, "-o", str(tmp_path / "out.onnx"), "--target-macs", "0.5",
                           "--calib", "models/digits_train.npz", "--calib-count", "16", "--no-latency",
                           "--report", str(tmp_path / "report"), *extra)
    assert code == 0
    flat = " ".join(out.split())
    assert ("fit was made on, so optimistic" in flat) == warned
    assert ("fit was made on, so optimistic" in (tmp_path / "report" / "report.md").read_text()) == warned
    assert json.loads((tmp_path / "report" / "report.json").read_text())["validation"]["on_fit_inputs"] == warned


def test_guard_without_validation_says_its_bounds_were_checked_on_the_calibration_inputs(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "compress", DIGITS, "-o", str(tmp_path / "out.onnx"), "--target-macs", "0.5",
                           "--calib", "models/digits_train.npz", "--calib-count", "16", "--min-cosine", "0.5",
                           "--no-validate")
    assert code == 0
    assert "guard bounds measured on the calibration inputs" in " ".join(out.split())
