"""Calibration activations in memory up to a budget, on disk past it."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import tempfile

import numpy as np
import pytest

from onnx_lowrank import activations, api, calibrate
from onnx_lowrank.activations import ActivationBudget, Batches
from onnx_lowrank.cli import main
from onnx_lowrank.config import Settings
from onnx_lowrank.errors import InputError


def test_budget_keeps_in_memory_up_to_its_limit_then_spills_and_frees(rng):
    budget = ActivationBudget(limit=1000)
    first = rng.standard_normal(100)                      # 800 bytes: kept
    second = rng.standard_normal(100)                     # over the limit: spilled
    batches = budget.batches([first, second])
    assert budget.held == 800
    spilled = list.__getitem__(batches, 1)
    assert spilled.path.is_file()
    np.testing.assert_array_equal(batches[0], first)
    np.testing.assert_array_equal(batches[1], second)
    assert [b.shape for b in batches] == [(100,), (100,)] and batches.dtype == np.float64
    path = spilled.path
    del batches, spilled, first
    gc.collect()
    assert budget.held == 0 and not path.exists()       # dropping a tensor frees memory and files
    budget.close()


def test_plain_batches_hold_arrays():
    batches = Batches([np.zeros(3, np.float32)])
    assert batches.dtype == np.float32 and len(list(batches)) == 1


def test_a_walk_on_disk_writes_the_same_model_as_in_memory(tmp_path, monkeypatch):
    settings = Settings(method="tucker2", target_macs=0.5, calib="models/digits_train.npz", calib_count=64,
                        batch_size=16, validate=False)
    api.compress("models/digits_cnn.onnx", tmp_path / "memory.onnx", settings)
    monkeypatch.setattr(calibrate, "ACTIVATION_MEMORY", 0)
    api.compress("models/digits_cnn.onnx", tmp_path / "disk.onnx", settings)
    assert (tmp_path / "memory.onnx").read_bytes() == (tmp_path / "disk.onnx").read_bytes()


def test_a_disk_too_small_for_the_spill_is_a_one_line_error_before_writing(rng, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    budget = ActivationBudget(limit=0)
    with pytest.raises(InputError, match=r"1000 B free, too little for the next 800 B .*TMPDIR.*--calib-count"):
        budget.keep(rng.standard_normal(100))
    assert [list(folder.iterdir()) for folder in tmp_path.iterdir()] == [[]]
    budget.close()
    assert list(tmp_path.iterdir()) == []


def test_a_terminated_run_deletes_its_spilled_activations(tmp_path, monkeypatch):
    """SIGTERM in the middle of a calibration walk: exit 143, no spill folder and no output left."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    keep = ActivationBudget.keep

    def keep_then_terminate(self, value):
        kept = keep(self, value)
        if self.spilled:
            os.kill(os.getpid(), signal.SIGTERM)
        return kept

    monkeypatch.setattr(ActivationBudget, "keep", keep_then_terminate)
    monkeypatch.setattr(calibrate, "ACTIVATION_MEMORY", 0)
    code = main(["compress", "models/digits_cnn.onnx", "-o", str(tmp_path / "out.onnx"), "--method", "svd",
                 "--target-macs", "0.5", "--calib", "models/digits_train.npz", "--calib-count", "32",
                 "--max-memory", "1M", "--no-validate"])
    assert code == 128 + signal.SIGTERM
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "out.onnx").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
