"""tools/gpu_check.py: its dry run end to end on CPU (so the GPU script cannot rot), the rank
multiple it derives from known staircases, and (marked gpu) its checks on a real CUDA device."""

from __future__ import annotations

import math
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import gpu_check  # noqa: E402

from onnx_lowrank import runtime  # noqa: E402


def test_dry_run_end_to_end(tmp_path):
    output = tmp_path / "bench_cuda.md"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--dry-run", "--output", str(output)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = output.read_text()
    assert done.stdout.strip() == text.strip()
    assert "| provider checked | cpu |" in text
    for method in ("svd", "tucker2"):  # full rank reproduces the layer
        assert re.search(rf"^\| digits \| {method} \| 2 of 2 \| .* \| exact \|$", text, re.M)
    assert re.search(r"^\| digits \| cp \| \d of 2 \| .*the device agrees \|$", text, re.M)
    rows = re.findall(r"^\| .* \| (tucker2|channel-svd) \| [\d.]+ \|", text, re.M)
    assert len(rows) == 10  # 5 shapes x 2 methods
    assert re.search(r"Suggested rank multiple on `cpu`: \*\*(4|8|16|32|64)\*\*", text)
    measured = r"CPUExecutionProvider \| 0\.\d+ \| \d+ \| 0\.9\d+ \| [\d.]+ \|"
    assert re.search(rf"^\| digits \| no \| {measured}", text, re.M)
    # Latency-aware plans follow timings: on a busy machine the closest plan may miss the target,
    # which compress refuses in one line (exit 2) and the table shows in place of the numbers.
    refused = r"\| \| \| \| .*closest plan keeps 0\.\d+, outside .*--rank-multiple \|"
    assert re.search(rf"^\| digits \| yes \| ({measured}|{refused})", text, re.M)


def _staircase(step: int, top: int = 128) -> dict[int, float]:
    """Latency that only grows with ``ceil(r / step)``: rounding up to `step` is free."""
    return {r: 1.0 + math.ceil(r / step) for r in range(4, top + 1, 4)}


def test_free_multiples_of_a_staircase():
    assert gpu_check.free_multiples(_staircase(16)) == [8, 16]
    assert gpu_check.free_multiples(_staircase(32)) == [8, 16, 32]
    assert gpu_check.free_multiples({r: float(r) for r in range(4, 129, 4)}) == []  # linear: nothing is free
    assert gpu_check.free_multiples({4: 1.0, 8: 1.0}) == [8]  # 16 and up: no rank tells


def test_suggested_multiple():
    def row(times):
        return {"chains": {str(r): t for r, t in times.items()}}

    assert gpu_check.suggested_multiple([row(_staircase(16))] * 5) == 16
    linear = row({r: float(r) for r in range(4, 129, 4)})
    assert gpu_check.suggested_multiple([row(_staircase(32))] * 4 + [linear]) == 32  # 80 % of the rows
    assert gpu_check.suggested_multiple([row(_staircase(32))] * 3 + [linear] * 2) == 4
    assert gpu_check.suggested_multiple([row(_staircase(64, top=16))]) == 8  # ranks up to 16 tell up to 8


CUDA = pytest.mark.skipif(not runtime._probe(runtime.CUDA)[0], reason="needs a working CUDAExecutionProvider")


@pytest.mark.gpu
@CUDA
def test_full_rank_chains_are_exact_on_cuda():
    answer = gpu_check.exactness_worker(str(gpu_check.DIGITS), [gpu_check.DIGITS_SHAPE],
                                        ["svd", "tucker2", "cp"], "cuda", layers=2, budget_s=60)
    verdicts = {row["method"]: gpu_check._exactness_verdict(row) for row in answer["rows"]}
    assert verdicts["svd"] == ("exact", True) and verdicts["tucker2"] == ("exact", True)
    assert verdicts["cp"][1]
    assert all(c["device"] <= gpu_check.DEVICE_RTOL for row in answer["rows"] for c in row["checked"]
               if c["cpu"] <= gpu_check.CPU_RTOL)


@pytest.mark.gpu
@CUDA
def test_dense_and_chains_are_timed_on_cuda():
    shape = {"label": "small", "channels_in": 32, "channels_out": 32, "size": 28}
    (tucker, svd) = gpu_check.ranks_worker("cuda", [shape], max_rank=16, warmup=2, repeats=5, budget_s=60)["results"]
    for result in (tucker, svd):
        assert result["dense"] > 0 and set(result["chains"]) == {"4", "8", "12", "16"}
        assert all(ms > 0 for ms in result["chains"].values())
