"""The README's quick start is run here, so the documentation cannot rot."""

from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import onnx

ROOT = pathlib.Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, flags=re.S)


def test_quick_start_has_exactly_two_setup_commands():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all(command.startswith("pip install ") for command in commands)
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].split("&&", 1)[1].strip() in ci


def test_quick_start_main_job_runs(tmp_path):
    install, job = quick_start_commands()[0].split("&&", 1)
    assert install.strip() == "pip install ."
    shutil.copytree(ROOT / "models", tmp_path / "models")
    argv = shlex.split(job.strip())
    assert argv[0] == "onnx-lowrank"
    result = subprocess.run([sys.executable, "-m", "onnx_lowrank", *argv[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "top-1 agreement" in result.stdout and "CPUExecutionProvider" in result.stdout
    output = tmp_path / argv[argv.index("-o") + 1]
    onnx.checker.check_model(onnx.load(str(output)))


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    (example,) = re.findall(r"```python\n(.*?)\n```", section, flags=re.S)
    shutil.copytree(ROOT / "models", tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert onnx.load(str(tmp_path / "digits_small.onnx")).graph.node
