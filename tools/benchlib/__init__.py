"""The parts the benchmark scripts of tools/ share; the package `onnx_lowrank` never imports them.

One module per job, imported one way (scripts -> benchlib -> onnx_lowrank, fetch_models):

    datasets    calibration and evaluation inputs: images, text lines, audio, sentences, bundled sets
    zoo         random feeds for the zoo models, their sigmoid-headed outputs, extra graph outputs
    inference   onnxruntime sessions; running a model over feeds
    scoring     how a compressed model's outputs compare with the original's (`onnx_lowrank.metrics`)
    child       one `compress` call in a fresh process: wall time, peak memory, the result as JSON
    timing      interleaved latency of two models, and where a model's kernel time goes
    provenance  the machine, versions, load, command line and the commit the package matches
    markdown    the documents: tables, headers, figures, writing and printing them
    cli         what every script's `main` does: lists from flags, a work folder, progress lines
    torch_export  torch modules built by the tools (ResNet-50, the Conv3d net) to ONNX

A script runs as `python tools/SCRIPT.py`, which puts tools/ first on `sys.path`; tests add it.
"""

import pathlib

#: The repository root (tools/.. ).
REPO = pathlib.Path(__file__).resolve().parents[2]
#: The tools/ folder, where the scripts and this package live.
TOOLS = REPO / "tools"
