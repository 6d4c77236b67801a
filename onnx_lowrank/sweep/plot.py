"""pareto.png: the frontier of a sweep, drawn from its `SweepResult`.

Two panels share the quality axis (the task metric, else top-1 agreement, else the worst
output cosine): against the measured end-to-end speed-up (left) and against the MACs kept
(right). Each method has a colour; Pareto points (on speed-up) are filled, joined by a line
(left) and labelled with their target and method; the `--min-metric` bound is a
dashed line and the picked point is ringed.
"""

from __future__ import annotations

from onnx_lowrank.plots import bare_figure

__all__ = ["pareto_figure"]

QUALITY_LABELS = {"metric": "task metric", "top1_agreement": "top-1 agreement", "cosine": "worst output cosine"}


def pareto_figure(result):
    """The figure of a `SweepResult` (see the module docstring)."""
    quality = QUALITY_LABELS[result.quality] + (f" ({result.settings.metric})" if result.quality == "metric" else "")
    figure = bare_figure(11.0, 4.6)
    speed_axes, macs_axes = figure.subplots(1, 2, sharey=True)
    made = [p for p in result.points if p.ok]
    colours = {method: f"C{i}" for i, method in enumerate(result.options.methods)}
    measured = result.original_latency is not None
    speed_title = "measured speed-up (original = 1)" if measured else "1 / MACs kept (latency not measured)"
    for axes, x_of, label in ((speed_axes, lambda p: p.speed, speed_title),
                              (macs_axes, lambda p: p.macs_kept, "fraction of the MACs kept")):
        for method, colour in colours.items():
            ours = [p for p in made if p.method == method]
            axes.scatter([x_of(p) for p in ours], [getattr(p, result.quality) for p in ours], s=[60 if p.pareto else 30
                         for p in ours], c=[colour if p.pareto else "white" for p in ours], edgecolors=colour,
                         label=method, zorder=3)
        for point in result.frontier:
            axes.annotate(point.label, (x_of(point), getattr(point, result.quality)), textcoords="offset points",
                          xytext=(4, 4), fontsize=7)
        if result.best is not None:
            axes.scatter([x_of(result.best)], [getattr(result.best, result.quality)], s=220, facecolors="none",
                         edgecolors="black", linewidths=1.2, zorder=4, label="picked")
        if result.options.min_metric is not None:
            axes.axhline(result.options.min_metric, color="gray", linestyle="--", linewidth=1,
                         label=f"--min-metric {result.options.min_metric:g}")
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
    frontier = result.frontier
    speed_axes.plot([p.speed for p in frontier], [getattr(p, result.quality) for p in frontier], color="black",
                    linewidth=0.8, alpha=0.6, zorder=2)
    if measured:
        speed_axes.axvline(1.0, color="gray", linewidth=0.8)
    macs_axes.invert_xaxis()
    speed_axes.set_ylabel(quality)
    speed_axes.legend(fontsize=8, loc="lower left")
    figure.suptitle(f"{result.name}: {quality} against speed "
                    f"({len(made)} of {len(result.points)} points, {len(frontier)} on the frontier)")
    if not made:
        speed_axes.text(0.5, 0.5, "no point has a model", ha="center", va="center", transform=speed_axes.transAxes)
    return figure
