"""Task metrics: how well a candidate model agrees with the original on the task itself.

A metric is ``f(original_outputs, candidate_outputs) -> float`` in ``[0, 1]`` (1 = the same
answers). Both arguments are lists with one ``{output name: array}`` dict per validation
batch, as `onnx_lowrank.compare.compare_models` collects them. The original's answers are
the ground truth: no labels are needed.

Built-in metrics (by name for `load_metric`):

* ``top1`` -- `classifier_top1`: arg-max agreement of a classifier;
* ``detection`` -- `detection_f1`: F1 of a YOLO-style detector's boxes after NMS;
* ``ctc`` -- `ctc_agreement`: exact agreement of greedy CTC decodes;
* ``textmap`` -- `textmap_f1`: F1 of the text boxes a DBNet-style probability map gives.

Anything else is named ``"module:function"`` (or ``"path/to/file.py:function"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from onnx_lowrank.errors import InputError
from onnx_lowrank.plugins import is_callable_spec, load_callable

__all__ = [
    "BUILTIN_METRICS",
    "Metric",
    "Proportion",
    "classifier_output",
    "classifier_top1",
    "top1_matches",
    "ctc_agreement",
    "ctc_greedy",
    "detection_f1",
    "load_metric",
    "textmap_f1",
]

logger = logging.getLogger(__name__)

Outputs = Sequence[dict[str, np.ndarray]]
Metric = Callable[[Outputs, Outputs], float]

#: Confidence threshold of a detection (score > threshold), as in YOLOv5/v8 validation.
CONF_THRESHOLD = 0.25
#: IoU above which NMS suppresses a box of the same class.
NMS_IOU = 0.45
#: IoU at which a candidate box matches an original box of the same class.
MATCH_IOU = 0.5
#: At most this many boxes enter NMS per image (highest scores first) ...
MAX_NMS = 30000
#: ... and at most this many leave it.
MAX_DET = 300
#: Class offset for per-class NMS in one pass (larger than any image side in pixels).
_CLASS_OFFSET = 7680.0
#: DBNet post-processing as PaddleOCR's DBPostProcess: pixels above this are text ...
TEXT_THRESHOLD = 0.3
#: ... a region whose mean probability is below this is dropped ...
BOX_THRESHOLD = 0.6
#: ... and so is one whose box is narrower than this, from pixel centre to pixel centre.
MIN_BOX_SIDE = 3


def _pick_output(
    original: Outputs,
    candidate: Outputs,
    want: Callable[[np.ndarray], bool],
    what: str,
    output: str | None,
) -> str:
    """Name of the output the metric reads: ``output`` or the first original one that fits."""
    if not original:
        raise InputError(f"{what} needs at least one batch of outputs, found none")
    if len(original) != len(candidate):
        raise InputError(
            f"{what}: {len(original)} batches of original outputs but {len(candidate)} "
            "of candidate outputs"
        )
    first = original[0]
    if output is not None:
        if output not in first:
            raise InputError(f"{what}: no output '{output}'; the outputs are: {', '.join(first)}")
        name = output
    else:
        fits = [n for n, a in first.items() if want(np.asarray(a))]
        if not fits:
            shapes = ", ".join(f"{n} {tuple(np.shape(a))}" for n, a in first.items())
            raise InputError(f"{what}: no output of the expected shape; found {shapes}")
        name = fits[0]
    for batch in candidate:
        if name not in batch:
            raise InputError(
                f"{what}: the candidate has no output '{name}'; it has: {', '.join(batch)}"
            )
    return name


class Proportion(float):
    """A score that is a proportion, ``successes / trials``, keeping both counts so that its
    interval is the Wilson interval (`intervals.wilson`); 1.0 when there are no trials."""

    def __new__(cls, successes: int, trials: int):
        value = super().__new__(cls, successes / trials if trials else 1.0)
        value.successes, value.trials = int(successes), int(trials)
        return value


def classifier_output(outputs: Mapping[str, np.ndarray]) -> str | None:
    """The output top-1 agreement reads, by one rule for `classifier_top1` and the validation:
    the first shaped ``[N, classes]`` with more than one class, else None."""
    return next((name for name, a in outputs.items() if np.ndim(a) == 2 and np.shape(a)[1] > 1), None)


def top1_matches(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(rows whose arg-max agrees, rows) of two ``[N, classes]`` arrays."""
    return int(np.count_nonzero(a.argmax(axis=-1) == b.argmax(axis=-1))), a.size // a.shape[-1]


def classifier_top1(original: Outputs, candidate: Outputs, *, output: str | None = None) -> float:
    """Top-1 agreement: the fraction of rows where both models pick the same class.

    ``mean_i [argmax_c a[i, c] == argmax_c b[i, c]]`` over every row ``i`` of every batch, for
    the output `classifier_output` picks (or `output`).

    Args:
        original: per-batch outputs of the original model.
        candidate: per-batch outputs of the candidate.
        output: the output to read; default: the first 2-D output with more than one class.

    Raises:
        InputError: no suitable output, or shapes that differ.
    """
    name = _pick_output(original, candidate, lambda a: a.ndim == 2 and a.shape[-1] > 1,
                        "top-1 agreement (an output shaped [N, classes])", output)
    same = total = 0
    for a_batch, b_batch in zip(original, candidate, strict=True):
        a, b = np.asarray(a_batch[name]), np.asarray(b_batch[name])
        if a.shape != b.shape:
            raise InputError(
                f"top-1 agreement: output '{name}' has shape {a.shape} in the original but "
                f"{b.shape} in the candidate"
            )
        agree, rows = top1_matches(a, b)
        same, total = same + agree, total + rows
    return Proportion(same, total)


def _xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [M, 4] with every box in ``b`` [K, 4] (x1, y1, x2, y2)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: keep the best box, drop those with IoU > threshold, repeat. Returns indices."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best = order[0]
        keep.append(best)
        rest = order[1:]
        if not rest.size:
            break
        ious = _pairwise_iou(boxes[best : best + 1], boxes[rest])[0]
        order = rest[ious <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def _yolo_layout(shape: tuple[int, ...], layout: str) -> str:
    if layout not in ("auto", "yolov8", "yolov5"):
        raise InputError(f"detection layout must be auto, yolov8 or yolov5, found '{layout}'")
    if layout != "auto":
        return layout
    # Anchors far outnumber channels (8400 vs 84, 25200 vs 85): the short axis is channels.
    return "yolov8" if shape[1] < shape[2] else "yolov5"


def _detect(pred: np.ndarray, layout: str, conf: float, nms_iou: float):
    """Boxes (x1y1x2y2), scores and classes of one image's raw YOLO prediction [A, C]."""
    if layout == "yolov8":
        xywh, class_scores = pred[:, :4], pred[:, 4:]
    else:
        xywh, class_scores = pred[:, :4], pred[:, 5:] * pred[:, 4:5]
    classes = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(pred)), classes]
    keep = scores > conf
    xywh, scores, classes = xywh[keep], scores[keep], classes[keep]
    if len(scores) > MAX_NMS:
        top = np.argsort(-scores, kind="stable")[:MAX_NMS]
        xywh, scores, classes = xywh[top], scores[top], classes[top]
    boxes = _xywh_to_xyxy(xywh.astype(np.float64))
    kept = _nms(boxes + classes[:, None] * _CLASS_OFFSET, scores, nms_iou)[:MAX_DET]
    return boxes[kept], scores[kept], classes[kept]


def _match(gt, det, iou_threshold: float) -> int:
    """True positives of one image's detections against the original's.

    Candidate boxes, best score first, each take the unmatched same-class original box of
    highest IoU when that IoU >= threshold.
    """
    gt_boxes, _, gt_classes = gt
    boxes, scores, classes = det
    if not len(gt_boxes) or not len(boxes):
        return 0
    iou = _pairwise_iou(boxes, gt_boxes)
    used = np.zeros(len(gt_boxes), dtype=bool)
    tp = 0
    for d in np.argsort(-scores, kind="stable"):
        ok = ~used & (gt_classes == classes[d]) & (iou[d] >= iou_threshold)
        if ok.any():
            used[np.argmax(np.where(ok, iou[d], -1.0))] = True
            tp += 1
    return tp


def _f1(tp: int, fp: int, fn: int) -> float:
    """``2 TP / (2 TP + FP + FN)``; 1.0 when neither model found anything."""
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 1.0


def detection_f1(
    original: Outputs,
    candidate: Outputs,
    *,
    output: str | None = None,
    layout: str = "auto",
    conf_threshold: float = CONF_THRESHOLD,
    nms_iou: float = NMS_IOU,
    match_iou: float = MATCH_IOU,
) -> float:
    """F1 of the candidate's detections against the original's, taken as ground truth.

    The raw output of a YOLO-style detector is decoded per image:

    * ``[N, 4+nc, A]`` (YOLOv8 layout): rows ``cx, cy, w, h`` then ``nc`` class scores;
      ``score = max_c cls_c``;
    * ``[N, A, 5+nc]`` (YOLOv5 layout): ``cx, cy, w, h, objectness`` then class
      probabilities; ``score = max_c obj * cls_c``.

    With ``layout="auto"`` the layout is told by shape: anchors outnumber channels, so
    ``[N, d1, d2]`` with ``d1 < d2`` is YOLOv8, otherwise YOLOv5 (pass ``layout`` for a
    transposed YOLOv8 output ``[N, A, 4+nc]``). Boxes with ``score > conf_threshold`` go
    through greedy per-class NMS (IoU > ``nms_iou`` suppressed; at most 300 kept).

    Each candidate box, best score first, matches the unmatched original box of the same
    class with the highest IoU if that IoU >= ``match_iou``. Over all images,
    ``F1 = 2 TP / (2 TP + FP + FN)`` where FP are unmatched candidate boxes and FN
    unmatched original boxes; no boxes in either model gives 1.0.

    Args:
        original: per-batch outputs of the original model.
        candidate: per-batch outputs of the candidate.
        output: the prediction output; default: the first 3-D output.
        layout: ``"auto"``, ``"yolov8"`` or ``"yolov5"``.
        conf_threshold: minimum score of a detection (exclusive).
        nms_iou: NMS suppression IoU.
        match_iou: IoU for a match.

    Raises:
        InputError: no 3-D output, too few channels for the layout, or different shapes.
    """
    name = _pick_output(
        original, candidate, lambda a: a.ndim == 3, "detection F1 (a YOLO output [N, *, *])", output
    )
    tp = fp = fn = 0
    for a_batch, b_batch in zip(original, candidate, strict=True):
        a, b = np.asarray(a_batch[name]), np.asarray(b_batch[name])
        if a.shape != b.shape or a.ndim != 3:
            raise InputError(
                f"detection F1: output '{name}' has shape {a.shape} in the original and "
                f"{b.shape} in the candidate; expected the same 3-D shape"
            )
        which = _yolo_layout(a.shape, layout)
        if which == "yolov8":
            a, b = a.transpose(0, 2, 1), b.transpose(0, 2, 1)
        minimum = 5 if which == "yolov8" else 6
        if a.shape[2] < minimum:
            raise InputError(
                f"detection F1: output '{name}' has {a.shape[2]} channels per box; the "
                f"{which} layout needs at least {minimum}"
            )
        for pa, pb in zip(a, b, strict=True):
            gt = _detect(pa, which, conf_threshold, nms_iou)
            det = _detect(pb, which, conf_threshold, nms_iou)
            hits = _match(gt, det, match_iou)
            tp += hits
            fp += len(det[0]) - hits
            fn += len(gt[0]) - hits
    return _f1(tp, fp, fn)


def ctc_greedy(labels: np.ndarray, blank: int) -> tuple[int, ...]:
    """Collapse repeats, then drop blanks: ``[0, 3, 3, 0, 3, 5, 5] -> (3, 3, 5)``."""
    if not labels.size:
        return ()
    changed = np.concatenate([[True], labels[1:] != labels[:-1]])
    kept = labels[changed]
    return tuple(int(x) for x in kept[kept != blank])


def ctc_agreement(
    original: Outputs,
    candidate: Outputs,
    *,
    output: str | None = None,
    time_major: bool = False,
    blank: int = 0,
) -> float:
    """Fraction of sequences whose greedy CTC decodes are identical.

    Greedy decoding: ``argmax`` over classes at every time step, collapse runs of the same
    label, drop the blank label (index ``blank``, 0 by default). A sequence counts when the
    candidate's decoded labels equal the original's exactly.

    Args:
        original: per-batch outputs of the original model.
        candidate: per-batch outputs of the candidate.
        output: the logits/probabilities output; default: the first 3-D output.
        time_major: the output is ``[T, N, C]`` instead of ``[N, T, C]``.
        blank: index of the blank label.

    Raises:
        InputError: no 3-D output or different shapes.
    """
    name = _pick_output(
        original, candidate, lambda a: a.ndim == 3, "CTC agreement (an output [N, T, C])", output
    )
    same = total = 0
    for a_batch, b_batch in zip(original, candidate, strict=True):
        a, b = np.asarray(a_batch[name]), np.asarray(b_batch[name])
        if a.shape != b.shape or a.ndim != 3:
            raise InputError(
                f"CTC agreement: output '{name}' has shape {a.shape} in the original and "
                f"{b.shape} in the candidate; expected the same 3-D shape"
            )
        if time_major:
            a, b = a.transpose(1, 0, 2), b.transpose(1, 0, 2)
        for la, lb in zip(a.argmax(axis=2), b.argmax(axis=2), strict=True):
            same += ctc_greedy(la, blank) == ctc_greedy(lb, blank)
            total += 1
    return Proportion(same, total)


def _regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-connected regions of a 2-D boolean mask, found over its row runs.

    Returns ``(label, row, span)``: one entry per run of True pixels, ``row`` its row,
    ``span[:, 0]`` / ``span[:, 1]`` its first / last column and ``label`` the region it belongs
    to (0..regions-1). Runs on adjacent rows join when their columns overlap or touch diagonally.
    """
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    start_rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1] - 1
    parent = list(range(len(starts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of_row = np.searchsorted(start_rows, np.arange(mask.shape[0] + 1))
    for y in range(1, mask.shape[0]):
        above, here = range(first_of_row[y - 1], first_of_row[y]), range(first_of_row[y], first_of_row[y + 1])
        i, j = above.start, here.start
        while i < above.stop and j < here.stop:
            if starts[i] <= ends[j] + 1 and starts[j] <= ends[i] + 1:
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    _, label = np.unique([root(i) for i in range(len(starts))], return_inverse=True)
    return label.astype(np.int64), start_rows, np.stack([starts, ends], axis=1)


def text_boxes(prob: np.ndarray, *, threshold: float = TEXT_THRESHOLD, box_threshold: float = BOX_THRESHOLD,
               min_side: int = MIN_BOX_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """The text boxes of one DBNet-style probability map ``[H, W]``: ``(boxes x1y1x2y2, scores)``.

    After PaddleOCR's DBPostProcess (its inference settings: threshold 0.3, box threshold 0.6,
    min size 3), simplified to axis-aligned boxes and without the unclip: the map is binarised
    at ``prob > threshold``; each 8-connected region gives its bounding box (pixel edges, so a
    single pixel at ``(x, y)`` is ``[x, y, x+1, y+1]``) and its score, the mean probability over
    the region's pixels; regions scoring below ``box_threshold``, or whose box is narrower than
    ``min_side`` from pixel centre to pixel centre (as ``cv2.minAreaRect`` measures a contour),
    are dropped.
    """
    prob = np.asarray(prob)
    mask = prob > threshold
    label, rows, span = _regions(mask)
    if not len(label):
        return np.zeros((0, 4)), np.zeros(0)
    count = label.max() + 1
    inside = np.where(mask, prob.astype(np.float64), 0.0)     # a NaN elsewhere cannot reach a score
    sums = np.cumsum(np.pad(inside, ((0, 0), (1, 0))), axis=1)
    run_sum = sums[rows, span[:, 1] + 1] - sums[rows, span[:, 0]]
    score = np.bincount(label, run_sum, count) / np.bincount(label, span[:, 1] - span[:, 0] + 1, count)
    boxes = np.full((count, 4), np.inf)
    boxes[:, 2:] = -np.inf
    np.minimum.at(boxes[:, 0], label, span[:, 0])
    np.minimum.at(boxes[:, 1], label, rows)
    np.maximum.at(boxes[:, 2], label, span[:, 1] + 1)
    np.maximum.at(boxes[:, 3], label, rows + 1)
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) - 1
    kept = (score >= box_threshold) & (sides >= min_side)
    return boxes[kept], score[kept]


def _probability_map(a: np.ndarray) -> bool:
    """Whether `a` has a probability map's shape, ``[N, 1, H, W]`` or ``[N, H, W]``."""
    return a.ndim == 3 or (a.ndim == 4 and a.shape[1] == 1)


def textmap_f1(
    original: Outputs,
    candidate: Outputs,
    *,
    output: str | None = None,
    threshold: float = TEXT_THRESHOLD,
    box_threshold: float = BOX_THRESHOLD,
    min_side: int = MIN_BOX_SIDE,
    match_iou: float = MATCH_IOU,
) -> float:
    """F1 of the text boxes of a segmentation-style text detector (DBNet, PP-OCR det) against
    the original's, taken as ground truth.

    Each image's probability map (``[N, 1, H, W]`` or ``[N, H, W]``) becomes boxes with
    `text_boxes`; candidate boxes, best score first, match the unmatched original box of highest
    IoU when that IoU >= ``match_iou``. Over all images ``F1 = 2 TP / (2 TP + FP + FN)``; no boxes
    in either model gives 1.0. Unlike a pixel IoU per image, a few stray pixels on an image
    without text cost nothing unless they form a confident box.

    Raises:
        InputError: no output of those shapes, or shapes that differ.
    """
    name = _pick_output(
        original, candidate, _probability_map,
        "text-map F1 (a probability map [N, 1, H, W])", output,
    )
    tp = fp = fn = 0
    for a_batch, b_batch in zip(original, candidate, strict=True):
        a, b = np.asarray(a_batch[name]), np.asarray(b_batch[name])
        if a.shape != b.shape or not _probability_map(a) or 0 in a.shape[-2:]:
            raise InputError(
                f"text-map F1: output '{name}' has shape {a.shape} in the original and "
                f"{b.shape} in the candidate; expected the same [N, 1, H, W] or [N, H, W]"
            )
        options = {"threshold": threshold, "box_threshold": box_threshold, "min_side": min_side}
        for pa, pb in zip(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), strict=True):
            gt_boxes, gt_scores = text_boxes(pa, **options)
            boxes, scores = text_boxes(pb, **options)
            hits = _match((gt_boxes, gt_scores, np.zeros(len(gt_boxes))), (boxes, scores, np.zeros(len(boxes))),
                          match_iou)
            tp += hits
            fp += len(boxes) - hits
            fn += len(gt_boxes) - hits
    return _f1(tp, fp, fn)


#: Metric names `load_metric` knows without an import.
BUILTIN_METRICS: dict[str, Metric] = {
    "top1": classifier_top1,
    "detection": detection_f1,
    "ctc": ctc_agreement,
    "textmap": textmap_f1,
}


def load_metric(spec: str | Metric) -> Metric:
    """The metric named by ``spec``.

    Args:
        spec: a built-in name (``top1``, ``detection``, ``ctc``, ``textmap``), ``"module:function"``
            (imported with `importlib`), ``"path/to/file.py:function"``, or a callable
            (returned as is).

    Raises:
        InputError: an unknown name, a module that fails to import, a missing attribute or
            one that is not callable.
    """
    if callable(spec):
        return spec
    text = str(spec).strip()
    if text in BUILTIN_METRICS:
        return BUILTIN_METRICS[text]
    if not is_callable_spec(text):
        raise InputError(
            f"unknown metric '{text}'; expected one of {', '.join(BUILTIN_METRICS)} or "
            "'module:function'"
        )
    metric = load_callable(text, "metric", "f(original_outputs, candidate_outputs) -> float")
    logger.debug("metric %s loaded", text)
    return metric
