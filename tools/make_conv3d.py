#!/usr/bin/env python3
"""Build a small video-style 3-D CNN (Conv3d) for the benchmark: train it briefly, export to ONNX.

The task is synthetic and labelled: a bright square moves left, right, up or down (label 0, 1,
2, 3) across 8 frames of 32x32 RGB, on a noisy background. Each clip draws its own square size
(5-10 px), colour (bright, per channel 0.6-1.0), speed (1-3 px per frame), start position (so
the square stays inside the frame), background level (0-0.3 per channel) and pixel noise
(sigma 0.02-0.15). Clips are float32 ``[3, 8, 32, 32]`` (C, T, H, W) in about [0, 1.3].

Architecture (input ``video`` ``[N, 3, 8, 32, 32]``, output ``logits`` ``[N, 4]``):

    Conv3d 3->32, 3x3x3, pad 1                      -> 32 x 8 x 32 x 32, ReLU
    Conv3d 32->64, 3x3x3, pad 1, stride (1, 2, 2)   -> 64 x 8 x 16 x 16, ReLU
    Conv3d 64->64, 3x3x3, pad 1, stride (1, 2, 2)   -> 64 x 8 x 8 x 8,  ReLU
    global average pool -> Linear 64->4

Training: Adam (lr 3e-3), batch 32, a fixed number of steps (default 120) on freshly drawn
clips (seed 0), CPU, 2 threads; about 40 s on 2 cores. Seeds are fixed.

Writes into the model cache folder (``--out-dir``, else ``$ONNX_LOWRANK_CACHE``, else
``~/.cache/onnx-lowrank/models``, as ``tools/fetch_models.py``):

* ``conv3d_motion.onnx`` -- TorchScript exporter, opset 17, dynamic batch;
* ``conv3d_motion_calib.npz`` -- ``video`` ``[64, 3, 8, 32, 32]`` (seed 1; labels under ``labels``);
* ``conv3d_motion_eval.npz`` -- ``video`` ``[256, 3, 8, 32, 32]`` and ``labels`` (seed 2),
  disjoint from the training and calibration clips (other seeds);

and prints a JSON line with the test accuracy (PyTorch and onnxruntime) and the largest logit
difference between the two. Needs ``torch==2.13.0`` (tool-only dependency, CPU wheel).

Usage:
    python tools/make_conv3d.py [--out-dir DIR] [--steps 120] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

FRAMES, SIZE, CLASSES = 8, 32, 4
LABELS = ("left", "right", "up", "down")
MODEL_NAME = "conv3d_motion"


def make_clips(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` clips [count, 3, 8, 32, 32] float32 and their labels (direction, cycling 0..3)."""
    rng = np.random.default_rng(seed)
    clips = np.empty((count, 3, FRAMES, SIZE, SIZE), dtype=np.float32)
    labels = np.arange(count, dtype=np.int64) % CLASSES
    rng.shuffle(labels)
    for i, label in enumerate(labels):
        side = int(rng.integers(5, 11))
        speed = int(rng.integers(1, 4))
        travel = speed * (FRAMES - 1)
        dy, dx = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0)}[int(label)]
        # start so that the square stays inside the frame for all 8 frames
        lo_x, hi_x = (travel, SIZE - side) if dx < 0 else (0, SIZE - side - (travel if dx > 0 else 0))
        lo_y, hi_y = (travel, SIZE - side) if dy < 0 else (0, SIZE - side - (travel if dy > 0 else 0))
        x0, y0 = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
        background = rng.uniform(0.0, 0.3, 3).astype(np.float32)
        colour = rng.uniform(0.6, 1.0, 3).astype(np.float32)
        noise = float(rng.uniform(0.02, 0.15))
        clip = np.broadcast_to(background[:, None, None, None], (3, FRAMES, SIZE, SIZE)).copy()
        for t in range(FRAMES):
            y, x = y0 + dy * speed * t, x0 + dx * speed * t
            clip[:, t, y:y + side, x:x + side] = colour[:, None, None]
        clip += rng.normal(0.0, noise, clip.shape).astype(np.float32)
        clips[i] = clip
    return clips, labels


def build_model():
    import torch
    from torch import nn

    class MotionNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv3d(3, 32, 3, padding=1)
            self.conv2 = nn.Conv3d(32, 64, 3, padding=1, stride=(1, 2, 2))
            self.conv3 = nn.Conv3d(64, 64, 3, padding=1, stride=(1, 2, 2))
            self.fc = nn.Linear(64, CLASSES)

        def forward(self, video):
            x = torch.relu(self.conv1(video))
            x = torch.relu(self.conv2(x))
            x = torch.relu(self.conv3(x))
            return self.fc(x.mean(dim=(2, 3, 4)))

    return MotionNet()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", help="default: the model cache folder (tools/fetch_models.py)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import onnxruntime as ort
    import torch

    from benchlib.datasets import batched
    from benchlib.inference import run_model
    from benchlib.scoring import accuracy
    from benchlib.torch_export import export_torch
    from fetch_models import default_cache_dir

    out_dir = pathlib.Path(args.out_dir).expanduser() if args.out_dir else default_cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build_model()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    train_rng_seed = 1000
    model.train()
    for step in range(args.steps):
        x, y = make_clips(32, seed=train_rng_seed + step)        # seed 1000+: disjoint from calib/eval
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} ({time.perf_counter() - start:.1f} s)",
                  file=sys.stderr, flush=True)
    train_s = time.perf_counter() - start
    model.eval()

    calib_x, calib_y = make_clips(64, seed=1)
    eval_x, eval_y = make_clips(256, seed=2)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(eval_x)).numpy()
    path = out_dir / f"{MODEL_NAME}.onnx"
    export_torch(model, torch.from_numpy(eval_x[:1]), path, "video", "logits")
    ort_logits = run_model(path, batched({"video": eval_x}, 64), threads=None)["logits"]
    np.savez(out_dir / f"{MODEL_NAME}_calib.npz", video=calib_x, labels=calib_y)
    np.savez(out_dir / f"{MODEL_NAME}_eval.npz", video=eval_x, labels=eval_y)
    result = {"model": str(path), "train_seconds": round(train_s, 1), "steps": args.steps,
              "torch_accuracy": accuracy(torch_logits, eval_y), "onnxruntime_accuracy": accuracy(ort_logits, eval_y),
              "max_logit_diff": float(np.abs(torch_logits - ort_logits).max()),
              "torch": torch.__version__, "onnxruntime": ort.__version__}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
