"""Tests for onnx_lowrank.metrics: known answers computed by hand."""

import numpy as np
import pytest

from onnx_lowrank.errors import InputError
from onnx_lowrank.metrics import (
    BUILTIN_METRICS,
    classifier_top1,
    ctc_agreement,
    detection_f1,
    load_metric,
)

# ------------------------------------------------------------------ top-1


def test_top1_agreement_counts_rows_over_batches():
    a1 = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    b1 = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])  # row 2 differs
    a2 = np.array([[0.0, 0.0, 1.0]])
    b2 = np.array([[0.0, 0.1, 0.9]])
    original = [
        {"feat": np.zeros((2, 4, 4)), "logits": a1},
        {"feat": np.zeros((1, 4, 4)), "logits": a2},
    ]
    candidate = [
        {"feat": np.zeros((2, 4, 4)), "logits": b1},
        {"feat": np.zeros((1, 4, 4)), "logits": b2},
    ]
    assert classifier_top1(original, candidate) == pytest.approx(2 / 3)
    assert classifier_top1(original[:1], original[:1]) == 1.0


def test_top1_errors():
    with pytest.raises(InputError, match="no output of the expected shape"):
        classifier_top1([{"y": np.zeros(3)}], [{"y": np.zeros(3)}])
    with pytest.raises(InputError, match="candidate has no output 'y'"):
        classifier_top1([{"y": np.zeros((1, 3))}], [{"z": np.zeros((1, 3))}])
    with pytest.raises(InputError, match="shape"):
        classifier_top1([{"y": np.zeros((1, 3))}], [{"y": np.zeros((1, 4))}])


# ------------------------------------------------------------------ detection


def _v8(boxes, nc=2, anchors=8):
    """A YOLOv8 raw output [1, 4+nc, A] from (cx, cy, w, h, class, score) tuples."""
    out = np.zeros((1, 4 + nc, anchors), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(boxes):
        out[0, :4, i] = (cx, cy, w, h)
        out[0, 4 + cls, i] = score
    return out


def _v5(boxes, nc=2, anchors=9):
    """A YOLOv5 raw output [1, A, 5+nc] from (cx, cy, w, h, class, objectness, prob) tuples."""
    out = np.zeros((1, anchors, 5 + nc), np.float32)
    for i, (cx, cy, w, h, cls, obj, prob) in enumerate(boxes):
        out[0, i, :5] = (cx, cy, w, h, obj)
        out[0, i, 5 + cls] = prob
    return out


BOXES = [
    (50, 50, 20, 20, 0, 0.9),
    (150, 50, 30, 30, 1, 0.8),
    (50, 150, 20, 40, 0, 0.7),
]


def _f1(original, candidate, **kw):
    return detection_f1([{"pred": original}], [{"pred": candidate}], **kw)


def test_detection_identical_is_one():
    out = _v8(BOXES)
    assert _f1(out, out) == 1.0


def test_detection_one_box_moved_far():
    moved = list(BOXES)
    moved[1] = (400, 400, 30, 30, 1, 0.8)
    # TP = 2, FP = 1 (the moved box), FN = 1 (the original box it left): F1 = 4 / 6.
    assert _f1(_v8(BOXES), _v8(moved)) == pytest.approx(4 / 6)


def test_detection_class_change_does_not_match():
    changed = list(BOXES)
    changed[0] = (50, 50, 20, 20, 1, 0.9)
    assert _f1(_v8(BOXES), _v8(changed)) == pytest.approx(4 / 6)


def test_detection_small_shift_still_matches():
    shifted = [(cx + 2, cy, w, h, c, s) for cx, cy, w, h, c, s in BOXES]  # IoU >= 0.5
    assert _f1(_v8(BOXES), _v8(shifted)) == 1.0


def test_detection_threshold_and_nms():
    # A box under the 0.25 threshold is not a detection; an overlapping same-class box
    # (IoU 0.82 > 0.45) is suppressed; the same box in another class is kept.
    original = _v8([(50, 50, 20, 20, 0, 0.9)])
    candidate = _v8(
        [
            (50, 50, 20, 20, 0, 0.9),
            (51, 51, 20, 20, 0, 0.6),  # suppressed by NMS
            (300, 300, 20, 20, 0, 0.2),  # below the threshold
        ]
    )
    assert _f1(original, candidate) == 1.0
    candidate = _v8([(50, 50, 20, 20, 0, 0.9), (51, 51, 20, 20, 1, 0.6)])
    # The class-1 box survives per-class NMS: TP 1, FP 1, FN 0 -> 2 / 3.
    assert _f1(original, candidate) == pytest.approx(2 / 3)


def test_detection_both_empty_and_one_empty():
    empty = _v8([])
    assert _f1(empty, empty) == 1.0
    assert _f1(_v8(BOXES), empty) == 0.0


def test_detection_each_original_box_matched_once():
    original = _v8([(60, 60, 20, 20, 0, 0.9)])
    # The top and bottom parts of the original box: each has IoU 0.7 with it, but only
    # 0.4 with each other, so both survive NMS (<= 0.45) and only the better one matches.
    candidate = _v8([(60, 57, 20, 14, 0, 0.9), (60, 63, 20, 14, 0, 0.8)])
    # TP 1, FP 1, FN 0 -> 2 / 3.
    assert _f1(original, candidate) == pytest.approx(2 / 3)


def test_detection_yolov5_layout_with_objectness():
    boxes = [(50, 50, 20, 20, 0, 0.9, 0.9), (150, 50, 30, 30, 1, 0.9, 0.8)]
    original = _v5(boxes)
    assert original.shape == (1, 9, 7)  # anchors > channels: YOLOv5 layout
    assert _f1(original, original) == 1.0
    # Objectness 0.2 x prob 0.9 = 0.18 < 0.25: the second box is gone.
    weak = _v5([boxes[0], (150, 50, 30, 30, 1, 0.2, 0.9)])
    assert _f1(original, weak) == pytest.approx(2 / 3)
    # The layout can also be named.
    assert _f1(original, weak, layout="yolov5") == pytest.approx(2 / 3)


def test_detection_counts_over_images_and_batches():
    a = np.concatenate([_v8(BOXES), _v8(BOXES[:1])])
    moved = list(BOXES)
    moved[2] = (400, 400, 20, 40, 0, 0.7)
    b = np.concatenate([_v8(moved), _v8(BOXES[:1])])
    # Image 1: TP 2, FP 1, FN 1; image 2: TP 1. Batch 2 repeats image 2: TP 1.
    original = [{"pred": a}, {"pred": _v8(BOXES[:1])}]
    candidate = [{"pred": b}, {"pred": _v8(BOXES[:1])}]
    assert detection_f1(original, candidate) == pytest.approx(8 / 10)


def test_detection_errors():
    with pytest.raises(InputError, match="expected shape"):
        detection_f1([{"y": np.zeros((1, 3))}], [{"y": np.zeros((1, 3))}])
    with pytest.raises(InputError, match="channels per box"):
        detection_f1([{"y": np.zeros((1, 3, 10))}], [{"y": np.zeros((1, 3, 10))}])
    with pytest.raises(InputError, match="layout"):
        detection_f1([{"y": _v8(BOXES)}], [{"y": _v8(BOXES)}], layout="ssd")


# ------------------------------------------------------------------ CTC


def _logits(*paths, classes=4):
    """[N, T, C] one-hot logits following the given label paths."""
    return np.stack([np.eye(classes, dtype=np.float32)[list(p)] for p in paths])


def test_ctc_greedy_collapse_and_blank():
    reference = _logits([0, 1, 1, 0, 1, 2, 2], [3, 3, 3, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0])
    candidate = _logits(
        [1, 1, 0, 1, 2, 0, 0],  # (1, 1, 2): same labels, other alignment
        [3, 0, 3, 0, 0, 0, 0],  # (3, 3): differs from (3,)
        [0, 0, 0, 0, 0, 0, 0],  # (): equal
    )
    assert ctc_agreement([{"logits": reference}], [{"logits": candidate}]) == pytest.approx(2 / 3)
    assert ctc_agreement([{"logits": reference}], [{"logits": reference}]) == 1.0


def test_ctc_time_major_and_blank_index():
    reference = _logits([0, 1, 1, 0, 1, 2, 2], [3, 3, 3, 0, 0, 0, 0])
    candidate = _logits([1, 0, 1, 1, 0, 2, 0], [3, 0, 0, 0, 0, 0, 0])
    outs = [{"o": reference.transpose(1, 0, 2)}], [{"o": candidate.transpose(1, 0, 2)}]
    assert ctc_agreement(*outs, time_major=True) == 1.0
    # With blank = 3 the second sequences decode to (0,) and (0,), the first ones differ.
    assert ctc_agreement(*outs, time_major=True, blank=3) == pytest.approx(1 / 2)


def test_ctc_errors():
    with pytest.raises(InputError, match="CTC"):
        ctc_agreement([{"o": np.zeros((1, 3))}], [{"o": np.zeros((1, 3))}])
    with pytest.raises(InputError, match="batches"):
        ctc_agreement([{"o": np.zeros((1, 3, 3))}], [])


# ------------------------------------------------------------------ load_metric


def test_load_metric_builtin_and_import(tmp_path):
    assert load_metric("top1") is classifier_top1
    assert load_metric("detection") is detection_f1
    assert load_metric("ctc") is ctc_agreement
    assert set(BUILTIN_METRICS) == {"top1", "detection", "ctc"}
    assert load_metric("onnx_lowrank.metrics:ctc_agreement") is ctc_agreement
    assert load_metric(len) is len
    script = tmp_path / "my_metric.py"
    script.write_text("def score(a, b):\n    return 0.5\n")
    assert load_metric(f"{script}:score")([], []) == 0.5


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "cannot import metric module 'no_such_module_xyz'"),
        ("math:no_such_function", "has no attribute 'no_such_function'"),
        ("math:pi", "expected a callable"),
        ("accuracy", "unknown metric 'accuracy'"),
        ("/nonexistent/file.py:f", "file.py: no such file"),
    ],
)
def test_load_metric_errors(spec, message):
    with pytest.raises(InputError, match=message):
        load_metric(spec)


def test_load_metric_module_raising_on_import(tmp_path):
    script = tmp_path / "broken_metric.py"
    script.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(InputError, match="RuntimeError: boom"):
        load_metric(f"{script}:f")
