#!/usr/bin/env python3
"""Probe: does a budget calibrated on each layer's REALISED output error beat the plain one?

Issue 20 item 4, option (a), measured outside the package (the package's own attempt, option (b),
is `--fit-aware-budget`: docs/bench_fit_aware.md). For each case of tools/bench_data_aware.py and
each target, two compressions, scored like the benchmark on its held-out set:

* `sequential`: the default pipeline (`compress --method auto --target-macs T --calib ...`);
* `calibrated`: the default pipeline with its `allocate` pass replaced by `Calibrated`:

  1. the plain budget (first plan);
  2. an independent data-aware fit at that plan (each layer on the ORIGINAL model's inputs, so
     no measurement depends on the ranks of the layers before it);
  3. for each layer it rewrote, the model with only that layer's chain in place is run on the
     calibration inputs; the realised error ``c_l`` is the gains' own measure (relative squared
     change of the model's outputs, a final softmax's input centred: `calibrate.output_gains`),
     the prediction ``p_l = gain_l · e_l(r_l)`` the budget's (output gain times the closed-form
     curve at the planned rank);
  4. every curve of layer l is scaled by ``clip(c_l / p_l, 1/CLIP, CLIP)``; a layer the first
     plan left dense takes the geometric mean of the measured ratios, so measured and unmeasured
     layers are not set apart by the measurement alone;
  5. the budget again on the scaled curves; then the default fit.

It prints each measured layer's prediction, realised error and ratio, and the layers re-planned.

Usage:
    python tools/probe_output_calibration.py [--models ppocrv4-rec,ppocr-mobile-v2-cls]
        [--targets 0.67,0.5] [--quick] [--threads 1] [--variants sequential,calibrated]
        [--gain-noise white|truncation]
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import tempfile
import time

import bench_data_aware as bda
import numpy as np
import onnx_graphsurgeon as gs
from benchlib import cli

from onnx_lowrank import api, calibrate, runtime
from onnx_lowrank.config import Settings
from onnx_lowrank.graph import with_outputs
from onnx_lowrank.methods import MethodSet
from onnx_lowrank.passes import FactorizePass, Pass, PassResult, default_pipeline
from onnx_lowrank.passes.pipeline import rank_policy
from onnx_lowrank.passes.rewrite import with_model_fields
from onnx_lowrank.rewrite.chain import apply_chain

#: The ratio's clip, fixed before any measurement (the issue's "clipped"): a factor of 4 either way.
CLIP = 4.0


class Calibrated(Pass):
    """The budget on closed-form curves scaled by each layer's realised / predicted output error."""

    name = "calibrated allocate"
    requires = ("layers", "calibration", "spectra")
    provides = ("ranks",)

    def __init__(self, budget, settings: Settings):
        self.budget = budget
        self.settings = settings
        self.methods = MethodSet(settings)

    def run(self, workspace, progress):
        saved = {name: copy.copy(d) for name, d in workspace.decisions.items()}
        wanted = [d.layer for d in workspace.candidates]
        self.budget.run(workspace, progress)
        first = _plan(workspace, wanted)
        start = time.perf_counter()
        FactorizePass(self.methods, self.settings.method, rank_policy(self.settings), data_aware=True,
                      sequential=False).run(workspace, progress)
        measure = _OutputError(workspace, self.settings.threads)
        ratios = {}
        for d in workspace.rewritten:
            realised = measure(d)
            predicted = (d.output_gain or 1.0) * dict(self._curves(workspace, d.layer)[d.method])[tuple(d.ranks)]
            ratios[d.layer.name] = float(np.clip(realised / max(predicted, 1e-30), 1 / CLIP, CLIP))
            cli.log(f"    {d.layer.name:24s} {d.method} {list(d.ranks)} gain {d.output_gain:.3g}: predicted "
                    f"{predicted:.3g}, realised {realised:.3g}, ratio {realised / max(predicted, 1e-30):.3g}")
        workspace.decisions = saved
        fill = float(np.exp(np.mean(np.log(list(ratios.values()))))) if ratios else 1.0
        curves = {layer.name: {m: [(r, e * ratios.get(layer.name, fill)) for r, e in curve]
                               for m, curve in self._curves(workspace, layer).items()} for layer in wanted}
        result = self.budget.with_curves(curves).run(workspace, progress)
        second = _plan(workspace, wanted)
        changed = {name: (first[name], second[name]) for name in first if first[name] != second[name]}
        cli.log(f"    dense layers' ratio {fill:.3g}; re-planned {changed}; {time.perf_counter() - start:.1f} s")
        return PassResult(True, f"{result.summary}; calibrated, {len(changed)} layers re-planned")

    def _curves(self, workspace, layer) -> dict[str, list]:
        """The budget's closed-form curves of `layer`, per method (`BudgetPass._options`' source)."""
        curves = {}
        for name in self.budget.method_names:
            method = self.methods.serving(name, layer)
            if method.not_applicable(layer) is None:
                spectra = workspace.spectra.get(layer.name, {}).get(method.name) or method.spectra(layer)
                curves[method.name] = method.error_curve(layer, spectra, self.budget.multiple)
        return curves


class _OutputError:
    """The relative squared change of the model's measured outputs with one layer's chain in place."""

    def __init__(self, workspace, threads):
        self.workspace = workspace
        self.threads = threads
        self.outputs = calibrate.measured_outputs(workspace.canonical)
        self.reference = self._run(workspace.canonical)

    def __call__(self, decision) -> float:
        canonical = self.workspace.canonical
        graph = gs.import_onnx(canonical)
        apply_chain(graph, {n.name: n for n in graph.nodes}[decision.layer.name], decision.layer, decision.chain)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        changed = self._run(with_model_fields(canonical, gs.export_onnx(graph, do_type_check=False),
                                              self.workspace.settings))
        return float(np.mean([np.sum((c - r) ** 2) / max(np.sum(r ** 2), 1e-30) for name in self.outputs
                              for r, c in zip(self.reference[name], changed[name], strict=True)]))

    def _run(self, model) -> dict[str, list[np.ndarray]]:
        session = runtime.make_session(with_outputs(model, self.outputs), "cpu", self.threads, produced=True)
        names = [o.name for o in session.get_outputs()]
        values = {name: [] for name in self.outputs}
        for feed in self.workspace.calibration:
            produced = dict(zip(names, session.run(None, feed), strict=True))
            for name, centring in self.outputs.items():
                values[name].append(calibrate._centred(np.asarray(produced[name], np.float64), centring))
        return values


def _plan(workspace, layers) -> dict[str, tuple | None]:
    decisions = (workspace.decisions[layer.name] for layer in layers)
    return {d.layer.name: (d.method, d.ranks) if d.reason is None else None for d in decisions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ppocrv4-rec,ppocr-mobile-v2-cls")
    parser.add_argument("--targets", default="0.67,0.5")
    parser.add_argument("--quick", action="store_true", help="the benchmark's smaller sets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="sequential,calibrated")
    parser.add_argument("--gain-noise", default="white", help="the gains' perturbation (`Settings.gain_noise`)")
    args = parser.parse_args(argv)
    targets = cli.numbers(args.targets)
    with tempfile.TemporaryDirectory() as folder:
        work = pathlib.Path(folder)
        for name in cli.names(args.models):
            case = bda.CASES[name]({name: targets}, args.quick)
            np.savez(work / "calib.npz", **case.arrays(case.calib))
            reference = case.evaluate(case.path, args.threads)
            for target in targets:
                for variant in cli.names(args.variants):
                    settings = Settings(method=case.methods[0], target_macs=target, calib=str(work / "calib.npz"),
                                        calib_count=case.calib_count, batch_size=case.batch,
                                        input_shape=tuple(case.compress_shape), validate=False,
                                        threads=args.threads, gain_noise=args.gain_noise, **case.extra_settings)
                    passes = None
                    if variant == "calibrated":
                        plain = default_pipeline(settings)
                        budget = plain.passes[plain.names.index("allocate")]
                        passes = plain.insert_before("allocate", Calibrated(budget, settings)).without("allocate")
                    cli.log(f"{name} {target:g} {variant}:")
                    start = time.perf_counter()
                    api.compress(str(case.path), str(work / "out.onnx"), settings, passes=passes)
                    seconds = time.perf_counter() - start
                    scores = case.score(reference, case.evaluate(work / "out.onnx", args.threads))
                    cli.log(f"  {', '.join(f'{k} {scores[k]:.4f}' for k in case.metric_names)}; {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
