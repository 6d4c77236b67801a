"""Calibration activations in memory up to a budget, on disk past it."""

from __future__ import annotations

import gc

import numpy as np

from onnx_lowrank import api, calibrate
from onnx_lowrank.activations import ActivationBudget, Batches
from onnx_lowrank.config import Settings


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
