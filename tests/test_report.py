"""Report contract validation, report.json/report.md/PNG writing and the Pareto helper."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from onnx_lowrank.report import ReportCurves, reused_calibration, validate_report, write_report

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _layer(name, op="Conv", method="tucker2", ranks=(16, 8), status="rewritten", reason=None,
           macs=(1_179_648, 458_752), params=(18_496, 7_232), weight_error=0.31, output_error=0.05):
    return {"name": name, "op": op, "method": method, "ranks": list(ranks) if ranks else None,
            "status": status, "reason": reason, "macs_before": macs[0], "macs_after": macs[1],
            "params_before": params[0], "params_after": params[1],
            "weight_rel_error": weight_error, "output_rel_error": output_error}


def sample_report() -> dict:
    """A realistic report: every status, a validation with latency, extra keys."""
    layers = [
        _layer("/conv1/Conv", ranks=(16, 1), status="skipped", macs=(18_432, 18_432),
               params=(320, 320), weight_error=1.0e-15, output_error=None,
               reason="ranks [16, 1] give 42,048 MACs, not fewer than the original 18,432"),
        _layer("/conv2/Conv", ranks=(32, 16), macs=(1_179_648, 458_752), params=(18_496, 7_232)),
        _layer("/conv3/Conv", ranks=(32, 32), macs=(589_824, 212_992), params=(36_928, 13_376)),
        _layer("/conv4/Conv", ranks=(24, 24), status="rolled_back", macs=(589_824, 589_824),
               params=(36_928, 36_928), weight_error=0.42, output_error=0.2,
               reason="output error 0.2 over --max-error 0.1 | rolled back"),
        _layer("/fc1/Gemm", op="Gemm", method="svd", ranks=(32,), macs=(16_384, 10_240),
               params=(16_448, 10_304), weight_error=0.139, output_error=None),
        _layer("/fc2/Gemm", op="Gemm", method=None, ranks=None, status="skipped",
               macs=(640, 640), params=(650, 650), weight_error=None, output_error=None,
               reason="not selected by --layers"),
    ]
    return {
        "tool_version": "0.1.0", "input": "models/digits_cnn.onnx", "output": "out/digits_lr.onnx",
        "settings": {"method": "auto", "rank_ratio": 0.5, "max_error": 0.1, "input_shape": [],
                     "mean": [0.0], "calib": None, "seed": 0},
        "totals": {"macs_before": 2_394_752, "macs_after": 1_290_880,
                   "params_before": 109_770, "params_after": 68_810},
        "layers": layers,
        "validation": {
            "provider": "CPUExecutionProvider", "inputs": 16,
            "outputs": [{"name": "logits", "rel_l2": 0.0553, "max_abs": 1.91, "cosine": 0.9983}],
            "top1_agreement": 0.9375,
            "latency_ms": {"before": {"median": 0.0527, "p90": 0.0563},
                           "after": {"median": 0.0345, "p90": 0.0361}},
            "speedup": 1.528, "metric": None,
        },
        "subgraph": {"note": "extra keys are allowed"},
    }


def sample_curves() -> ReportCurves:
    rng = np.random.default_rng(0)
    spectra, errors, chosen = {}, {}, {}
    for name, size in (("/conv2/Conv", 64), ("/conv3/Conv", 64), ("/fc1/Gemm", 64),
                       ("/conv1/Conv", 16), ("/conv4/Conv", 64), ("/fc2/Gemm", 10),
                       ("/extra/MatMul", 32)):
        values = np.sort(rng.gamma(1.0, size=size) * np.exp(-np.arange(size) / 8))[::-1]
        spectra[name] = values
        ranks = np.arange(1, size + 1)
        energy = np.cumsum(values[::-1] ** 2)[::-1]
        errors[name] = (ranks, np.sqrt(np.append(energy[1:], 0.0) / energy[0]))
        chosen[name] = size // 4
    return ReportCurves(spectra=spectra, error_curves=errors, chosen=chosen)


def assert_png(path: pathlib.Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000, path
    assert data.startswith(PNG_SIGNATURE), path


# ------------------------------------------------------------------------------------ validate


def test_realistic_report_validates():
    validate_report(sample_report())


def test_null_validation_and_null_latency_validate():
    report = sample_report()
    report["validation"]["latency_ms"] = None
    report["validation"]["speedup"] = None
    report["validation"]["top1_agreement"] = None
    report["validation"]["outputs"][0]["rel_l2"] = None  # non-finite values are written as null
    validate_report(report)
    report["validation"] = None
    validate_report(report)


def _without(key):
    def edit(report):
        target, _, last = _resolve(report, key)
        del target[last]
    return edit


def _set(key, value):
    def edit(report):
        target, _, last = _resolve(report, key)
        target[last] = value
    return edit


def _resolve(report, dotted):
    parts = []
    for piece in dotted.split("."):
        name, *indices = piece.replace("]", "").split("[")
        parts.append(name)
        parts.extend(int(i) for i in indices)
    target = report
    for part in parts[:-1]:
        target = target[part]
    return target, parts[:-1], parts[-1]


VIOLATIONS = [
    # (edit, path named in the message, words in the message)
    (_without("tool_version"), "tool_version", "missing"),
    (_set("input", 3), "input", "expected str"),
    (_set("settings", None), "settings", "expected an object"),
    (_without("totals.params_after"), "totals.params_after", "missing"),
    (_set("totals.macs_before", 2.5e6), "totals.macs_before", "expected int"),
    (_set("totals.macs_after", True), "totals.macs_after", "expected int"),
    (_set("totals.params_before", -1), "totals.params_before", ">= 0"),
    (_set("layers", {}), "layers", "expected a list"),
    (_set("layers[2]", "conv"), "layers[2]", "expected an object"),
    (_without("layers[1].name"), "layers[1].name", "missing"),
    (_set("layers[3].status", "done"), "layers[3].status",
     "expected one of rewritten, skipped, rolled_back, found 'done'"),
    (_set("layers[1].ranks", 16), "layers[1].ranks", "list of ints or null"),
    (_set("layers[1].ranks", [32, 16.0]), "layers[1].ranks[1]", "expected int"),
    (_set("layers[1].ranks", [32, 0]), "layers[1].ranks[1]", ">= 1"),
    (_set("layers[1].method", 7), "layers[1].method", "expected null or str"),
    (_set("layers[0].reason", ["x"]), "layers[0].reason", "expected null or str"),
    (_set("layers[4].macs_after", "10240"), "layers[4].macs_after", "expected int"),
    (_set("layers[4].params_before", 16448.0), "layers[4].params_before", "expected int"),
    (_set("layers[2].weight_rel_error", "0.2"), "layers[2].weight_rel_error", "expected null or float"),
    (_set("layers[2].output_rel_error", float("nan")), "layers[2].output_rel_error", "finite"),
    (_without("layers[5].output_rel_error"), "layers[5].output_rel_error", "missing"),
    (_without("validation"), "validation", "missing"),
    (_set("validation", []), "validation", "an object or null"),
    (_without("validation.provider"), "validation.provider", "missing"),
    (_set("validation.inputs", 16.0), "validation.inputs", "expected int"),
    (_set("validation.outputs", None), "validation.outputs", "expected a list"),
    (_without("validation.outputs[0].cosine"), "validation.outputs[0].cosine", "missing"),
    (_set("validation.outputs[0].max_abs", float("inf")), "validation.outputs[0].max_abs", "finite"),
    (_set("validation.top1_agreement", "high"), "validation.top1_agreement", "expected null or float"),
    (_without("validation.latency_ms.after"), "validation.latency_ms.after", "missing"),
    (_set("validation.latency_ms.before.p90", None), "validation.latency_ms.before.p90",
     "expected float"),
    (_without("validation.speedup"), "validation.speedup", "missing"),
]


@pytest.mark.parametrize(("edit", "path", "words"), VIOLATIONS,
                         ids=[f"{path}:{words}" for _, path, words in VIOLATIONS])
def test_each_violation_names_its_path(edit, path, words):
    report = sample_report()
    edit(report)
    with pytest.raises(ValueError) as caught:
        validate_report(report)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert words in message, message


def test_not_a_dict_is_rejected():
    with pytest.raises(ValueError, match=r"^report: expected an object, found list"):
        validate_report([])


def test_first_offending_path_is_named():
    report = sample_report()
    report["layers"][1]["status"] = "done"
    report["layers"][4]["status"] = "gone"
    with pytest.raises(ValueError, match=r"^layers\[1\]\.status"):
        validate_report(report)


# ------------------------------------------------------------------------------------- write


def test_write_report_files(tmp_path):
    report = sample_report()
    folder = tmp_path / "nested" / "report"
    written = write_report(report, folder)
    names = [path.name for path in written]
    assert names == ["report.json", "report.md", "macs_per_layer.png"]
    assert all(path.parent == folder for path in written)
    with open(folder / "report.json") as handle:
        assert json.load(handle) == report
    assert_png(folder / "macs_per_layer.png")
    assert not (folder / "spectra.png").exists()
    assert not (folder / "error_vs_rank.png").exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temporary files left


def test_markdown_content(tmp_path):
    report = sample_report()
    write_report(report, tmp_path)
    text = (tmp_path / "report.md").read_text()
    for layer in report["layers"]:
        assert layer["name"] in text
    for key in ("macs_before", "macs_after", "params_before", "params_after"):
        assert f"{report['totals'][key]:,}" in text
    assert "53.9%" in text  # MACs after / before
    assert "CPUExecutionProvider" in text and "0.998300" in text and "0.9375" in text
    assert "1.528x" in text
    assert "output error 0.2 over --max-error 0.1 \\| rolled back" in text  # pipe escaped
    table = [line for line in text.splitlines() if line.startswith("| /")]
    order = [line.split(" | ")[0].removeprefix("| ") for line in table]
    # rewritten by MACs saved, then rolled back, then skipped in report order
    assert order == ["/conv2/Conv", "/conv3/Conv", "/fc1/Gemm", "/conv4/Conv", "/conv1/Conv",
                     "/fc2/Gemm"]


def test_markdown_not_validated(tmp_path):
    report = sample_report()
    report["validation"] = None
    write_report(report, tmp_path)
    assert "Not validated." in (tmp_path / "report.md").read_text()


def test_invalid_report_writes_nothing(tmp_path):
    report = sample_report()
    report["layers"][0]["status"] = "done"
    with pytest.raises(ValueError, match=r"layers\[0\]\.status"):
        write_report(report, tmp_path / "out")
    assert not (tmp_path / "out" / "report.json").exists()


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    write_report(sample_report(), tmp_path)
    before = (tmp_path / "report.json").read_bytes()
    changed = sample_report()
    changed["tool_version"] = "9.9.9"

    def refuse(*args):
        raise OSError("disk full")

    monkeypatch.setattr("onnx_lowrank.report.os.replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_report(changed, tmp_path)
    assert (tmp_path / "report.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["macs_per_layer.png", "report.json",
                                                          "report.md"]


def test_curve_plots_with_curves(tmp_path):
    written = write_report(sample_report(), tmp_path, curves=sample_curves())
    assert [p.name for p in written] == ["report.json", "report.md", "macs_per_layer.png",
                                         "spectra.png", "error_vs_rank.png"]
    for name in ("macs_per_layer.png", "spectra.png", "error_vs_rank.png"):
        assert_png(tmp_path / name)


def test_only_given_curves_are_plotted(tmp_path):
    curves = sample_curves()
    written = write_report(sample_report(), tmp_path, curves=ReportCurves(spectra=curves.spectra))
    assert [p.name for p in written][-1] == "spectra.png"
    assert not (tmp_path / "error_vs_rank.png").exists()


def test_malformed_curve_is_named(tmp_path):
    curves = ReportCurves(error_curves={"/fc1/Gemm": (np.arange(4), np.zeros(3))})
    with pytest.raises(ValueError, match=r"error_curves\['/fc1/Gemm'\]"):
        write_report(sample_report(), tmp_path, curves=curves)


def test_many_layers_plot(tmp_path):
    report = sample_report()
    report["layers"] = [_layer(f"/block{i}/a/very/long/layer/name/that/keeps/going/Conv",
                               macs=(1000 * (i + 1), 400 * (i + 1))) for i in range(45)]
    write_report(report, tmp_path)
    assert_png(tmp_path / "macs_per_layer.png")


def test_real_report_end_to_end(tmp_path):
    from onnx_lowrank import api
    from onnx_lowrank.report import compression_report

    source = ROOT / "models" / "digits_cnn.onnx"
    output = tmp_path / "out.onnx"
    workspace = api.compress(source, output)
    report = compression_report(workspace, str(source), str(output))
    validate_report(report)
    written = write_report(report, tmp_path / "report")
    assert [p.name for p in written] == ["report.json", "report.md", "macs_per_layer.png"]
    loaded = json.loads((tmp_path / "report" / "report.json").read_text())
    assert loaded == json.loads(json.dumps(report))
    text = (tmp_path / "report" / "report.md").read_text()
    for layer in report["layers"]:
        assert layer["name"] in text
    assert_png(tmp_path / "report" / "macs_per_layer.png")


def test_reused_calibration_reads_the_report_settings():
    assert reused_calibration({"calib": "c.npz", "data_aware": True, "eval": None})
    assert reused_calibration({"calib": "c.npz"})
    assert not reused_calibration({"calib": "c.npz", "eval": "e.npz"})
    assert not reused_calibration({"calib": "c.npz", "data_aware": False})
    assert not reused_calibration({"calib": None})
