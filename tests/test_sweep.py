"""`onnx-lowrank sweep`: the frontier of the bundled digits CNN, shared statistics, the files, Ray."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex
import shutil

import matplotlib.image
import pytest

from onnx_lowrank import Settings, calibrate, compress, inspect
from onnx_lowrank.cli import main
from onnx_lowrank.sweep import SweepPoint, sweep
from onnx_lowrank.sweep.points import fastest_meeting, pareto_flags, quality_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
TRAIN = ROOT / "models" / "digits_train.npz"
TEST = ROOT / "models" / "digits_test.npz"
#: The Ray test's settings, small enough for the suite: 64 calibration images, 120 held-out ones, one thread.
DIGITS = dict(calib=str(TRAIN), eval=str(TEST), metric="top1", batch_size=60, calib_count=64, eval_count=120, threads=1)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The fields of sweep.json that come from clocks (or, like the frontier, depend on them).
TIMED = {"latency_ms", "speedup", "compress_seconds", "pareto", "seconds", "picked", "executor"}


def _counting(name: str, counts: dict, original):
    def counted(*args, **kwargs):
        key = (name, kwargs.get("sequential", True)) if name == "walk_layers" else (name,)
        counts[key] = counts.get(key, 0) + 1
        return original(*args, **kwargs)
    return counted


def _readme_section() -> str:
    return (ROOT / "README.md").read_text().split("### `sweep`", 1)[1].split("\n### ", 1)[0]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The README's 3-point sweep of digits through the command line, counting the calibration walks."""
    (command,) = re.findall(r"```sh\n(onnx-lowrank sweep models/digits.*?)\n```", _readme_section(), flags=re.S)
    argv = shlex.split(command)
    folder = tmp_path_factory.mktemp("sweep")
    shutil.copytree(ROOT / "models", folder / "models")
    counts: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in ("walk_layers", "output_gains"):
            patch.setattr(calibrate, name, _counting(name, counts, getattr(calibrate, name)))
        code = main(argv[1:])
    out = folder / argv[argv.index("-o") + 1]
    return code, out, json.loads((out / "sweep.json").read_text()), counts


def test_sweep_lists_three_points_with_the_macs_of_the_written_files(swept):
    code, folder, report, _ = swept
    assert code == 0
    assert [(p["target"], p["method"]) for p in report["points"]] == [(0.7, "tucker2"), (0.5, "tucker2"),
                                                                     (0.3, "tucker2")]
    original = inspect(MODEL).totals
    for point in report["points"]:
        written = inspect(folder / point["file"]).totals
        assert (point["macs"], point["params"]) == (written["macs"], written["params"])
        assert point["macs_kept"] == pytest.approx(written["macs"] / original["macs"])
        assert abs(point["macs_kept"] - point["target"]) <= 0.02
        low, high = point["metric_ci95"]
        assert 0 <= point["metric"] <= 1 and low <= point["metric"] <= high + 1e-12   # Wilson's 1 - 1 ulp at p = 1
        assert point["inputs"] == 360 and point["speedup"] > 0 and point["compress_seconds"] > 0
    macs = [p["macs"] for p in report["points"]]
    assert macs == sorted(macs, reverse=True)
    assert report["latency_ms"]["original"]["median"] > 0 and report["quality"] == "metric"


def test_sweep_writes_markdown_and_a_valid_png(swept):
    _, folder, report, _ = swept
    data = (folder / "pareto.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert matplotlib.image.imread(folder / "pareto.png").shape[2] in (3, 4)
    text = (folder / "sweep.md").read_text()
    assert all(p["file"] in text for p in report["points"])


def test_sweep_walks_the_original_once_for_all_points(swept):
    _, _, report, counts = swept
    assert counts[("walk_layers", False)] == 1         # the data spectra, shared
    assert counts[("output_gains",)] == 1               # the output gains, shared
    assert counts[("walk_layers", True)] == 3           # the sequential fit, one per point
    assert report["statistics"]["calibration_walks"] == 1 and report["statistics"]["output_gain_runs"] == 1


def test_min_metric_picks_the_fastest_point_meeting_it(swept):
    _, _, report, _ = swept
    meeting = [i for i, p in enumerate(report["points"]) if p["metric"] >= report["min_metric"]]
    assert report["picked"] == max(meeting, key=lambda i: report["points"][i]["speedup"])


def test_the_readme_python_example_gives_the_models_compress_gives(tmp_path, monkeypatch):
    (example,) = re.findall(r"```python\n(.*?)\n```", _readme_section(), flags=re.S)
    shutil.copytree(ROOT / "models", tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    result = namespace["result"]
    point = result.points[1]
    alone = compress("models/digits_cnn.onnx", "alone.onnx", dataclasses.replace(
        result.settings, method=point.method, target_macs=point.target, rank_ratio=None, latency=False))
    assert point.macs == alone.totals_after["macs"] and point.params == alone.totals_after["params"]
    assert point.metric == alone.validation.metric and point.cosine == min(o.cosine for o in alone.validation.outputs)
    assert (tmp_path / "api-sweep" / point.file).read_bytes() == (tmp_path / "alone.onnx").read_bytes()
    assert set(result.frontier) == {p for p in result.points if p.pareto} and result.best is None


def _point(target, quality, speedup, error=None):
    return SweepPoint(target, "svd", error=error, metric=quality, macs_kept=target, speedup=speedup)


def test_pareto_flags_on_a_constructed_frontier():
    points = [_point(0.9, 0.99, 1.1), _point(0.8, 0.97, 1.3), _point(0.7, 0.96, 1.2),   # dominated by 0.8
              _point(0.6, 0.90, 1.6), _point(0.5, 0.90, 1.6), _point(0.4, None, None, "unreachable"),
              _point(0.3, 0.50, 1.5)]                                                     # dominated by 0.6
    assert pareto_flags(points, "metric") == [True, True, False, True, True, False, False]
    assert fastest_meeting(points, "metric", 0.95) == 1
    assert fastest_meeting(points, "metric", 0.999) is None
    assert quality_of(points) == "metric"
    assert quality_of([SweepPoint(0.5, "svd", cosine=0.9, macs_kept=0.5)]) == "cosine"


def test_without_latency_the_frontier_reads_the_macs():
    points = [SweepPoint(0.7, "svd", metric=0.9, macs_kept=0.7), SweepPoint(0.5, "svd", metric=0.9, macs_kept=0.5)]
    assert pareto_flags(points, "metric") == [False, True]


def test_many_models_from_a_models_file(tmp_path, capsys):
    for name in ("digits_cnn.onnx", "digits_train.npz", "digits_test.npz"):
        shutil.copy(ROOT / "models" / name, tmp_path / name)
    (tmp_path / "models.toml").write_text(
        '[[model]]\nname = "first"\npath = "digits_cnn.onnx"\ncalib = "digits_train.npz"\neval = "digits_test.npz"\n'
        '[[model]]\nname = "second"\npath = "digits_cnn.onnx"\ncalib = "digits_train.npz"\ncalib_count = 16\n')
    code = main(["sweep", str(tmp_path / "models.toml"), "--targets", "0.6", "--methods", "svd", "--metric", "top1",
                 "--batch-size", "60", "--calib-count", "32", "--eval-count", "60", "--no-latency",
                 "-o", str(tmp_path / "out"), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in printed["models"]] == ["first", "second"]
    assert printed["models"][0]["points"][0]["on_fit_inputs"] is False      # its own --eval
    assert printed["models"][1]["points"][0]["on_fit_inputs"] is True       # scored on its calibration inputs
    assert json.loads((tmp_path / "out" / "sweep.json").read_text()) == printed
    for name in ("first", "second"):
        assert (tmp_path / "out" / name / "pareto.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "first/sweep.md" in (tmp_path / "out" / "sweep.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--metric", "top1", "--targets", "0.5,1.5"], "--targets must be fractions in (0, 1]"),
    (["--metric", "top1", "--methods", "svd,nope"], "unknown method nope"),
    (["--metric", "top1", "--keep", "best"], "--keep best keeps the point --min-metric picks"),
    (["--min-metric", "0.9"], "--min-metric needs a task metric"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address needs --executor ray"),
    (["--latency-on", "worker"], "--latency-on worker times the models on a cluster worker"),
    (["--config", "{config}"], "the targets set the ranks; drop rank"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, flags, message):
    (tmp_path / "rank.toml").write_text("rank = 8\n")
    flags = [flag.format(config=tmp_path / "rank.toml") for flag in flags]
    code = main(["sweep", str(MODEL), "--calib", str(TRAIN), *flags, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_bad_models_file_is_one_line(tmp_path, capsys):
    (tmp_path / "models.toml").write_text('[[model]]\nname = "x"\n')
    assert main(["sweep", str(tmp_path / "models.toml"), "-o", str(tmp_path / "out")]) == 2
    assert "expected path = " in capsys.readouterr().err


def test_local_and_ray_executors_give_the_same_json(tmp_path):
    pytest.importorskip("ray")
    from onnx_lowrank.sweep import RayExecutor

    settings = Settings(**DIGITS)
    local = sweep(MODEL, settings, targets=(0.7, 0.4), methods=("tucker2",), output=tmp_path / "local", keep="all")
    cluster = RayExecutor(cpus=2)
    try:
        remote = sweep(MODEL, settings, targets=(0.7, 0.4), methods=("tucker2",), output=tmp_path / "ray", keep="all",
                       executor=cluster)
    finally:
        cluster.close()
    assert remote.executor == "ray" and remote.statistics["calibration_walks"] == 1

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k not in TIMED}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    assert untimed(local.to_dict()) == untimed(remote.to_dict())
    for point in local.points:
        assert (tmp_path / "local" / point.file).read_bytes() == (tmp_path / "ray" / point.file).read_bytes()
