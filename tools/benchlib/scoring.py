"""How a compressed model's outputs compare with the original's, per kind of model.

A score is `score(original, candidate) -> {metric: value}` over two `{output name: array}`
dicts holding every evaluation sample (samples on axis 0, as `inference.run_model` returns
them); the factories below bind the output to read. Task agreement goes through
`onnx_lowrank.metrics` (`classifier_top1`, `ctc_agreement`, `textmap_f1`), the same code the
tool's `--metric` runs; the original's answers are the reference, labels only give accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnx_lowrank import metrics

Outputs = dict[str, np.ndarray]
Score = Callable[[Outputs, Outputs], dict]

#: A classifier's answer counts as confident when its top probability beats the runner-up by this.
CONFIDENT_MARGIN = 0.5
#: Text-map pixels above this are text (PaddleOCR's DB post-processing threshold).
TEXT_THRESHOLD = metrics.TEXT_THRESHOLD
#: silero-vad says "speech" above this probability.
SPEECH_THRESHOLD = 0.5


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample cosine of the flattened outputs (axis 0 = samples), in float64."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def _cosine(a: np.ndarray, b: np.ndarray) -> dict:
    cos = cosines(a, b)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of rows whose arg-max is the label."""
    return float((logits.argmax(1) == labels).mean())


def top1(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 agreement of two `[N, classes]` outputs (`onnx_lowrank.metrics.classifier_top1`)."""
    return metrics.classifier_top1([{"y": a}], [{"y": b}], output="y")


def _probabilities(logits: np.ndarray) -> np.ndarray:
    """Rows as probabilities: kept when they already are (non-negative, summing to 1), else softmax."""
    x = logits.astype(np.float64)
    if (x >= 0).all() and np.allclose(x.sum(1), 1.0, atol=1e-3):
        return x
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def classifier(output: str, labels: np.ndarray | None = None) -> Score:
    """Scores of a classifier's `output` [N, classes]: `top1` agreement; `top1_confident`, the
    agreement over the samples the original answers confidently (top probability >= runner-up
    + `CONFIDENT_MARGIN`; NaN when there are none), with their count `confident` of `samples`;
    per-sample output `cosine` (mean) and `cosine_min`; with `labels`, the candidate's `accuracy`."""
    def score(original: Outputs, candidate: Outputs) -> dict:
        a, b = original[output], candidate[output]
        top2 = np.sort(_probabilities(a), axis=1)[:, -2:]
        confident = top2[:, 1] - top2[:, 0] >= CONFIDENT_MARGIN
        row = {"top1": top1(a, b), "samples": len(a), "confident": int(confident.sum()),
               "top1_confident": top1(a[confident], b[confident]) if confident.any() else float("nan"),
               **_cosine(a, b)}
        if labels is not None:
            row["accuracy"] = accuracy(b, labels)
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


def rec_charset(path) -> list[str]:
    """A PaddleOCR recogniser's labels: blank, the dictionary in the model's metadata, space."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


def _text(charset: list[str], labels: tuple[int, ...]) -> str:
    """The text of a decoded label sequence (labels past the charset dropped)."""
    return "".join(charset[i] for i in labels if i < len(charset))


def decode_rec(charset: list[str], probs: np.ndarray) -> list[str]:
    """Greedy CTC decodes (`onnx_lowrank.metrics.ctc_greedy`, blank 0) of [N, T, C] as text."""
    return [_text(charset, metrics.ctc_greedy(row, 0)) for row in probs.argmax(2)]


def ctc(output: str, charset: list[str] | None = None, truth: list[str] | None = None) -> Score:
    """Scores of a CTC recogniser's `output` [N, T, C] (blank 0): `strings`, exact agreement of
    the greedy decodes (`onnx_lowrank.metrics.ctc_agreement`); `chars`, 1 - edit distance /
    longer length of the two decoded label sequences, averaged; per-sample `cosine` and
    `cosine_min`; with the `charset` and the rendered `truth`, `read`: the share of lines the
    candidate reads exactly right (outer spaces stripped)."""
    def score(original: Outputs, candidate: Outputs) -> dict:
        a, b = original[output], candidate[output]
        ref_labels = [metrics.ctc_greedy(r, 0) for r in a.argmax(2)]
        out_labels = [metrics.ctc_greedy(o, 0) for o in b.argmax(2)]
        row = {"strings": metrics.ctc_agreement([{output: a}], [{output: b}], output=output, blank=0),
               "chars": float(np.mean([1.0 - _edit_distance(x, y) / max(len(x), len(y), 1)
                                       for x, y in zip(ref_labels, out_labels)])),
               **_cosine(a, b)}
        if truth is not None:
            row["read"] = float(np.mean([_text(charset, labels).strip() == t for labels, t in zip(out_labels, truth)]))
        return row
    return score


def textmap_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image IoU of two probability maps binarised at `TEXT_THRESHOLD` (1 when both are empty)."""
    ma, mb = a.reshape(len(a), -1) > TEXT_THRESHOLD, b.reshape(len(b), -1) > TEXT_THRESHOLD
    union = (ma | mb).sum(1)
    return np.where(union > 0, (ma & mb).sum(1) / np.maximum(union, 1), 1.0)


def textmap(output: str) -> Score:
    """Scores of a text detector's probability map `output` [N, 1, H, W]: `iou` (mean) and
    `iou_min` of `textmap_iou`; `iou_pooled`, the IoU of all images' pixels together; `boxes`,
    the F1 of the text boxes (`onnx_lowrank.metrics.textmap_f1`); per-image `cosine`,
    `cosine_min`; `max_abs`, the largest absolute difference."""
    def score(original: Outputs, candidate: Outputs) -> dict:
        a, b = original[output], candidate[output]
        iou = textmap_iou(a, b)
        ma, mb = a > TEXT_THRESHOLD, b > TEXT_THRESHOLD
        return {"iou": float(iou.mean()), "iou_min": float(iou.min()),
                "iou_pooled": float((ma & mb).sum() / max((ma | mb).sum(), 1)),
                "boxes": metrics.textmap_f1([{output: a}], [{output: b}], output=output),
                "max_abs": float(np.abs(a - b).max()), **_cosine(a, b)}
    return score


def embedding(original: Outputs, candidate: Outputs) -> dict:
    """Scores of a sentence embedder: per-sentence `cosine` / `cosine_min` of `sentence_embedding`
    and, when the outputs hold it, the mean per-sample `hidden_cosine` of `last_hidden_state`."""
    row = _cosine(original["sentence_embedding"], candidate["sentence_embedding"])
    if "last_hidden_state" in original:
        row["hidden_cosine"] = float(cosines(original["last_hidden_state"], candidate["last_hidden_state"]).mean())
    return row


def vad(original: Outputs, candidate: Outputs) -> dict:
    """Scores of silero-vad's `speech_probs`, one row per sequence: per-sequence `cosine` /
    `cosine_min`, `max_dp` (largest absolute probability difference), `speech_fraction` (the
    candidate's windows over `SPEECH_THRESHOLD`) and `decision` (speech / no speech agreement)."""
    a, b = original["speech_probs"], candidate["speech_probs"]
    return {**_cosine(a, b), "max_dp": float(np.abs(a - b).max()),
            "speech_fraction": float((b > SPEECH_THRESHOLD).mean()),
            "decision": float(((a > SPEECH_THRESHOLD) == (b > SPEECH_THRESHOLD)).mean())}
