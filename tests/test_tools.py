"""tools/: every script imports, the scripts depend on benchlib and not on each other, and the
cheapest benchmark runs end to end on the bundled digits model, so the tools cannot rot."""

from __future__ import annotations

import ast
import importlib
import json
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
SCRIPTS = sorted(p.stem for p in TOOLS.glob("*.py"))
#: Scripts other modules of tools/ may import: the zoo library, and the one shared case table.
IMPORTABLE_SCRIPTS = {"fetch_models": "the zoo library", "bench_data_aware": "the probes' cases"}


@pytest.fixture
def tools_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")          # what export_minilm sets when imported
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_and_has_a_main(tools_path, name):
    module = importlib.import_module(name)
    assert callable(module.main)


def _imports(path: pathlib.Path) -> set[str]:
    """The modules of tools/ (scripts and benchlib modules) that `path` imports, by name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "benchlib":
                found |= {f"benchlib.{alias.name}" for alias in node.names}
    local = set(SCRIPTS) | {f"benchlib.{p.stem}" for p in (TOOLS / "benchlib").glob("*.py")}
    return found & local


def test_tools_import_one_way_without_cycles():
    graph = {p.stem: _imports(p) for p in TOOLS.glob("*.py")}
    graph |= {f"benchlib.{p.stem}": _imports(p) for p in (TOOLS / "benchlib").glob("*.py")}
    for name, imported in graph.items():
        scripts = {m for m in imported if not m.startswith("benchlib")}
        allowed = {"fetch_models"} if name.startswith("benchlib") else set(IMPORTABLE_SCRIPTS)
        assert scripts <= allowed, f"{name} imports the scripts {sorted(scripts - allowed)}"
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            assert name != start, f"an import cycle runs through {start}"
            if name not in seen:
                seen.add(name)
                todo += graph.get(name, ())


def test_scores_of_a_model_against_itself_are_perfect(tools_path):
    from benchlib import scoring

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 5)).astype(np.float32)
    row = scoring.classifier("y", labels=logits.argmax(1))({"y": logits}, {"y": logits})
    assert row["top1"] == row["accuracy"] == 1.0 and row["cosine_min"] == pytest.approx(1.0)
    maps = rng.random((3, 1, 16, 16)).astype(np.float32)
    row = scoring.textmap("m")({"m": maps}, {"m": maps})
    assert row["iou"] == row["iou_pooled"] == row["boxes"] == 1.0 and row["max_abs"] == 0.0
    # p and 1 - p are both text where 0.3 < p < 0.7, and one of them is text everywhere
    middle = ((maps > 0.3) & (maps < 0.7)).reshape(3, -1).mean(1)
    assert scoring.textmap_iou(maps, 1.0 - maps) == pytest.approx(middle)


def test_bench_data_aware_runs_end_to_end_on_digits(tools_path, tmp_path):
    """The cheapest benchmark path: one weight-only compression of the bundled model in a child
    process, counted, scored against the original and written as Markdown and JSON."""
    bench_data_aware = importlib.import_module("bench_data_aware")
    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    code = bench_data_aware.main(["--models", "digits", "--targets", "digits=0.5", "--variants", "weight-only",
                                  "--threads", "1", "--out", str(out), "--plot", "", "--json", str(raw)])
    assert code == 0
    (row,) = json.loads(raw.read_text())
    assert row["status"] == "ok", row.get("traceback")
    assert abs(row["kept_macs"] - 0.5) <= 0.02                 # the tool's budget band
    assert row["peak_mib"] >= row["base_mib"] > 0
    assert 0.0 <= row["top1"] <= 1.0 and row["cosine"] <= 1.0 + 1e-9
    assert "| 0.5 | auto | weight-only |" in out.read_text()
