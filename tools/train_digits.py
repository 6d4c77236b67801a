#!/usr/bin/env python3
"""Train the bundled digits CNN and export it to ONNX.

Trains a small CNN on scikit-learn's 8x8 handwritten digits data set
(``sklearn.datasets.load_digits``, shipped with scikit-learn, no download),
exports it to ONNX (opset 17) and writes, into ``--out-dir``:

* ``digits_cnn.onnx``  - the model: input ``input`` [N,1,8,8] float32 in [0,1],
  output ``logits`` [N,10]; dynamic batch axis.
* ``digits_train.npz`` - training split, keys ``input`` (float32 [N,1,8,8]) and
  ``labels`` (int64 [N]).
* ``digits_test.npz``  - test split, same keys.

Torch is a tool-only dependency of this script (``pip install torch==2.13.0``);
the ``onnx_lowrank`` package itself does not need it. Everything is seeded and
deterministic, so re-running on the same software versions gives the same
weights. Usage::

    python tools/train_digits.py [--out-dir models] [--epochs 60]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from benchlib import REPO
from benchlib.scoring import accuracy
from benchlib.torch_export import MAX_IR_VERSION

SEED = 0
OPSET = 17


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    return (
        np.ascontiguousarray(x_train, dtype=np.float32),
        np.ascontiguousarray(x_test, dtype=np.float32),
        np.ascontiguousarray(y_train, dtype=np.int64),
        np.ascontiguousarray(y_test, dtype=np.int64),
    )


def build_model():
    import torch.nn as nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
            self.relu2 = nn.ReLU()
            self.pool1 = nn.MaxPool2d(2)  # 8x8 -> 4x4
            self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
            self.relu3 = nn.ReLU()
            self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
            self.relu4 = nn.ReLU()
            self.pool2 = nn.MaxPool2d(2)  # 4x4 -> 2x2
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(64 * 2 * 2, 64)
            self.relu5 = nn.ReLU()
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x):
            x = self.relu1(self.conv1(x))
            x = self.pool1(self.relu2(self.conv2(x)))
            x = self.relu3(self.conv3(x))
            x = self.pool2(self.relu4(self.conv4(x)))
            x = self.flatten(x)
            x = self.relu5(self.fc1(x))
            return self.fc2(x)

    return DigitsCNN()


def random_shift(x, gen):
    """Shift each image by -1, 0 or +1 pixel in each axis (zero fill)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))  # [n,1,10,10]
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None, :])  # [n,8]
    cols = (dx[:, None] + torch.arange(8)[None, :])  # [n,8]
    idx_n = torch.arange(n)[:, None, None]
    out = padded[idx_n, 0, rows[:, :, None], cols[:, None, :]]  # [n,8,8]
    return out.unsqueeze(1)


def accuracy_torch(model, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    return accuracy(logits, y), logits


def train(model, x_train, y_train, x_test, y_test, epochs: int, batch_size: int):
    import torch
    import torch.nn as nn

    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    n = xt.shape[0]
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            xb = random_shift(xt[idx], gen)
            yb = yt[idx]
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        sched.step()
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            acc, _ = accuracy_torch(model, x_test, y_test)
            print(f"epoch {epoch + 1:3d}  loss {total / n:.4f}  test acc {acc:.4f}",
                  flush=True)


def export_onnx(model, path: Path) -> None:
    import onnx
    import torch

    model.eval()
    dummy = torch.zeros(1, 1, 8, 8, dtype=torch.float32)
    with warnings.catch_warnings():
        # The classic TorchScript exporter (dynamo=False) is deprecated but
        # still yields the cleanest graph: plain Conv/Relu/MaxPool/Gemm nodes,
        # weights as initializers, module-path node names (/conv1/Conv).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            opset_version=OPSET,
            do_constant_folding=True,
            export_params=True,
            dynamo=False,
        )
    m = onnx.load(str(path))
    if m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
    m.doc_string = ("Small CNN trained on scikit-learn's 8x8 handwritten digits "
                    "(UCI ML hand-written digits, CC BY 4.0); input pixels / 16.")
    onnx.checker.check_model(m, full_check=True)
    bad = [n.name for n in m.graph.node if n.op_type == "Constant"]
    if bad:
        raise RuntimeError(f"exported graph contains Constant nodes: {bad}")
    init_names = {t.name for t in m.graph.initializer}
    if [i.name for i in m.graph.input] != ["input"] or not init_names:
        raise RuntimeError("expected one graph input and weights as initializers")
    onnx.save(m, str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=REPO / "models",
                    help="output directory (default: the repo's models/)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import onnxruntime as ort
    import torch

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    t0 = time.time()
    x_train, x_test, y_train, y_test = load_data()
    print(f"train {x_train.shape}  test {x_test.shape}")
    model = build_model()
    train(model, x_train, y_train, x_test, y_test, args.epochs, args.batch_size)
    torch_acc, torch_logits = accuracy_torch(model, x_test, y_test)
    print(f"training took {time.time() - t0:.1f} s")

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "digits_cnn.onnx"
    export_onnx(model, onnx_path)
    np.savez_compressed(out / "digits_train.npz", input=x_train, labels=y_train)
    np.savez_compressed(out / "digits_test.npz", input=x_test, labels=y_test)

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = sess.run(["logits"], {"input": x_test})[0]
    onnx_acc = accuracy(onnx_logits, y_test)
    max_diff = float(np.abs(onnx_logits - torch_logits).max())
    print(f"torch test accuracy: {torch_acc:.4f}")
    print(f"onnx  test accuracy: {onnx_acc:.4f}  (max |logit diff| {max_diff:.2e})")
    if onnx_acc != torch_acc:
        print("ERROR: ONNX accuracy differs from torch accuracy", file=sys.stderr)
        return 1
    print(f"test accuracy: {onnx_acc:.4f} ({int(round(onnx_acc * len(y_test)))}"
          f"/{len(y_test)})")
    print(f"wrote {onnx_path}, {out / 'digits_train.npz'}, {out / 'digits_test.npz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
