"""Metrics checked against numbers worked out by hand, then against scikit-learn on random data."""

import json
import math

import numpy as np
import pytest

from steel_seg.metrics import (
    SegmentationEvaluator,
    confusion_matrix,
    dice_pairs,
    format_scores,
    segmentation_scores,
)

# One 3x4 image, classes 0 (background), 1, 2; the bottom-right pixel is ignored (255).
LABEL = np.array(
    [
        [0, 0, 1, 1],
        [0, 2, 2, 1],
        [0, 0, 0, 255],
    ]
)
PRED = np.array(
    [
        [0, 1, 1, 1],
        [0, 2, 0, 0],
        [0, 0, 1, 2],
    ]
)
# Worked by hand over the 11 counted pixels, (true, pred):
#   row 0: (0,0) (0,1) (1,1) (1,1)
#   row 1: (0,0) (2,2) (2,0) (1,0)
#   row 2: (0,0) (0,0) (0,1)          [(255,2) ignored]
# confusion matrix (rows true, cols pred):
#   [[4, 2, 0],
#    [1, 2, 0],
#    [1, 0, 1]]
# row sums (true) 6 3 2; col sums (pred) 6 4 1; tp 4 2 1; fp 2 2 0; fn 2 1 1
# IoU       = 4/8, 2/5, 1/2         mIoU = (1/2 + 2/5 + 1/2) / 3 = 7/15
# precision = 4/6, 2/4, 1/1
# recall    = 4/6, 2/3, 1/2
# F1        = 8/12, 4/7, 2/3        (2tp / (2tp + fp + fn))
# pixel accuracy = 7/11
# kappa: po = 77/121, pe = (6*6 + 3*4 + 2*1)/121 = 50/121 -> (77 - 50)/(121 - 50) = 27/71
# Dice, class 1: pred 4 px, true 3 px, overlap 2 -> 4/7
# Dice, class 2: pred 1 px (the ignored pixel's 2 is not counted), true 2 px, overlap 1 -> 2/3
# Kaggle Dice = (4/7 + 2/3) / 2 = 13/21
HAND_CM = [[4, 2, 0], [1, 2, 0], [1, 0, 1]]


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, LABEL, num_classes=3)
    assert cm.dtype == np.int64
    assert cm.tolist() == HAND_CM


def test_segmentation_scores_by_hand():
    s = segmentation_scores(np.array(HAND_CM))
    assert s["iou"] == pytest.approx([1 / 2, 2 / 5, 1 / 2])
    assert s["miou"] == pytest.approx(7 / 15)
    assert s["precision"] == pytest.approx([4 / 6, 2 / 4, 1])
    assert s["recall"] == pytest.approx([4 / 6, 2 / 3, 1 / 2])
    assert s["f1"] == pytest.approx([8 / 12, 4 / 7, 2 / 3])
    assert s["pixel_accuracy"] == pytest.approx(7 / 11)
    assert s["kappa"] == pytest.approx(27 / 71)


def test_scores_are_plain_python_and_json_serialisable():
    s = segmentation_scores(np.array(HAND_CM))
    assert type(s["miou"]) is float and type(s["iou"]) is list and type(s["iou"][0]) is float
    json.dumps(s)


def test_class_absent_everywhere_is_nan_and_left_out_of_miou():
    # Same data with a 4th class that neither labels nor predictions use.
    s = segmentation_scores(confusion_matrix(PRED, LABEL, num_classes=4))
    assert all(math.isnan(s[k][3]) for k in ("iou", "precision", "recall", "f1"))
    assert s["miou"] == pytest.approx(7 / 15)


def test_ignored_pixels_are_not_counted():
    label = np.full_like(LABEL, 255)
    cm = confusion_matrix(PRED, label, num_classes=3)
    assert cm.sum() == 0
    s = segmentation_scores(cm)
    assert math.isnan(s["miou"]) and math.isnan(s["pixel_accuracy"]) and math.isnan(s["kappa"])


def test_dice_pairs_by_hand():
    d = dice_pairs(PRED[None], LABEL[None], num_classes=3)
    assert d.shape == (1, 2)
    assert d[0].tolist() == pytest.approx([4 / 7, 2 / 3])


def test_dice_empty_empty_is_one_and_empty_vs_nonempty_is_zero():
    label = np.array([[[0, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    pred = np.array([[[0, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]]])
    d = dice_pairs(pred, label, num_classes=2)
    # image 0: both empty -> 1; image 1: missed defect -> 0; image 2: false defect -> 0
    assert d[:, 0].tolist() == [1.0, 0.0, 0.0]


def test_dice_ignores_predictions_under_ignored_pixels():
    label = np.array([[255, 0], [0, 0]])
    pred = np.array([[1, 0], [0, 0]])
    assert dice_pairs(pred, label, num_classes=2).tolist() == [[1.0]]


def test_evaluator_by_hand():
    ev = SegmentationEvaluator(num_classes=3, class_names=["background", "pits", "scratches"])
    ev.update(PRED, LABEL)  # (H, W) counts as one image
    r = ev.result()
    assert r["confusion_matrix"] == HAND_CM
    assert r["miou"] == pytest.approx(7 / 15)
    assert r["kappa"] == pytest.approx(27 / 71)
    assert r["dice_per_class"] == pytest.approx([4 / 7, 2 / 3])
    assert r["kaggle_dice"] == pytest.approx(13 / 21)
    assert r["num_images"] == 1
    assert r["class_names"] == ["background", "pits", "scratches"]
    json.dumps(r)


def test_evaluator_accepts_paddleseg_keepdim_shape():
    ev = SegmentationEvaluator(num_classes=3)
    ev.update(PRED[None, None], LABEL[None, None])  # (N, 1, H, W)
    assert ev.result()["confusion_matrix"] == HAND_CM


def test_accumulating_batches_equals_one_big_batch():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, size=(10, 6, 7))
    label[rng.random(label.shape) < 0.1] = 255
    pred = rng.integers(0, 4, size=(10, 6, 7))
    pred[:3] = 0  # some images without any predicted defect
    whole = SegmentationEvaluator(num_classes=4)
    whole.update(pred, label)
    split = SegmentationEvaluator(num_classes=4)
    for lo, hi in [(0, 3), (3, 4), (4, 10)]:
        split.update(pred[lo:hi], label[lo:hi])
    np.testing.assert_equal(split.result(), whole.result())
    # ...and agrees with the stand-alone functions on the same batch.
    r = whole.result()
    assert r["confusion_matrix"] == confusion_matrix(pred, label, 4).tolist()
    assert r["kaggle_dice"] == pytest.approx(dice_pairs(pred, label, 4).mean())


def test_reset_forgets_everything():
    ev = SegmentationEvaluator(num_classes=3)
    ev.update(PRED, LABEL)
    ev.reset()
    r = ev.result()
    assert r["num_images"] == 0 and np.sum(r["confusion_matrix"]) == 0
    assert math.isnan(r["kaggle_dice"]) and math.isnan(r["miou"])


# Seven 2x2 images, classes 0, 1, 2. Per image, does it (truly / predictedly) contain the class?
#   img  class 1                      class 2
#   0    true, pred (1 px) -> TP      -        -> TN
#   1    true, no pred     -> FN      pred only (1 px) -> FP
#   2    pred only (1 px)  -> FP      true, pred (1 px) -> TP
#   3    -                 -> TN      true, no pred -> FN
#   4    -                 -> TN      true, pred (1 px) -> TP
#   5    pred only (2 px)  -> FP      -        -> TN
#   6    pred only under the ignored pixel -> TN (not counted)
# min_pixels=0: class 1 TP 1 FP 2 FN 1 -> P 1/3, R 1/2; class 2 TP 2 FP 1 FN 1 -> P 2/3, R 2/3
# min_pixels=1 (need 2+ px): class 1 TP 0 FP 1 (img 5) FN 2 -> P 0, R 0;
#                            class 2 TP 0 FP 0 FN 3 -> P NaN (nothing predicted), R 0
DET_LABEL = np.array(
    [
        [[1, 0], [0, 0]],
        [[1, 1], [0, 0]],
        [[0, 0], [2, 2]],
        [[2, 0], [0, 0]],
        [[2, 2], [0, 0]],
        [[0, 0], [0, 0]],
        [[255, 0], [0, 0]],
    ]
)
DET_PRED = np.array(
    [
        [[1, 0], [0, 0]],
        [[0, 0], [0, 2]],
        [[1, 0], [2, 0]],
        [[0, 0], [0, 0]],
        [[0, 2], [0, 0]],
        [[1, 1], [0, 0]],
        [[1, 0], [0, 0]],
    ]
)


def test_detection_precision_recall_by_hand():
    ev = SegmentationEvaluator(num_classes=3)
    ev.update(DET_PRED, DET_LABEL)
    r = ev.result()
    assert r["detection_precision"] == pytest.approx([1 / 3, 2 / 3])
    assert r["detection_recall"] == pytest.approx([1 / 2, 2 / 3])


def test_detection_min_pixels():
    ev = SegmentationEvaluator(num_classes=3, min_pixels=1)
    ev.update(DET_PRED, DET_LABEL)
    r = ev.result()
    assert r["detection_precision"][0] == 0.0 and math.isnan(r["detection_precision"][1])
    assert r["detection_recall"] == [0.0, 0.0]


def test_all_background_predictor_scores_zero_on_defects():
    ev = SegmentationEvaluator(num_classes=3)
    ev.update(np.zeros_like(DET_LABEL), DET_LABEL)
    r = ev.result()
    assert r["iou"][1:] == [0.0, 0.0]
    assert r["recall"][1:] == [0.0, 0.0] and r["f1"][1:] == [0.0, 0.0]
    assert all(math.isnan(p) for p in r["precision"][1:])  # never predicted: undefined
    assert r["detection_recall"] == [0.0, 0.0]
    assert r["kappa"] == 0.0


def test_kappa_perfect_is_one_and_constant_is_zero():
    label = np.array([[0, 1, 2], [2, 1, 0]])
    assert segmentation_scores(confusion_matrix(label, label, 3))["kappa"] == pytest.approx(1.0)
    constant = np.full_like(label, 1)
    assert segmentation_scores(confusion_matrix(constant, label, 3))["kappa"] == pytest.approx(0.0)
    # All one class on both sides: agreement is entirely by chance, kappa is undefined.
    background = np.zeros_like(label)
    assert math.isnan(segmentation_scores(confusion_matrix(background, background, 3))["kappa"])


@pytest.mark.parametrize(
    "pred, label, match",
    [
        (np.array([[0, 5]]), np.array([[0, 1]]), "pred contains class id.* 5"),
        (np.array([[0, 1]]), np.array([[0, 7]]), "label contains class id.* 7"),
        (np.array([[0, -1]]), np.array([[0, 1]]), "pred contains class id.* -1"),
        (np.array([[0, 1]]), np.array([[0, 1, 1]]), "shapes differ"),
        (np.array([[0.2, 0.8]]), np.array([[0, 1]]), "argmax"),
    ],
)
def test_bad_inputs_raise_clear_errors(pred, label, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(pred, label, num_classes=3)
    with pytest.raises(ValueError, match=match):
        SegmentationEvaluator(num_classes=3).update(pred, label)


def test_evaluator_rejects_wrong_number_of_class_names():
    with pytest.raises(ValueError, match="2 names but num_classes is 3"):
        SegmentationEvaluator(num_classes=3, class_names=["background", "pits"])


def test_format_scores_lists_classes_and_summary():
    names = ["background", "pits", "inclusion", "unused"]
    ev = SegmentationEvaluator(num_classes=4, class_names=names)
    ev.update(PRED, LABEL)
    text = format_scores(ev.result(), None)
    for word in ("background", "pits", "unused", "mIoU", "pixel accuracy", "kappa", "Kaggle Dice"):
        assert word in text
    assert "n/a" in text  # the unused class has no IoU
    assert "0.4667" in text  # mIoU 7/15
    assert format_scores(ev.result(), ["a", "b", "c", "d"]).splitlines()[1].startswith("a ")
    # A bare segmentation_scores() dict prints too, without the per-image columns' values.
    bare = format_scores(segmentation_scores(np.array(HAND_CM)), ["bg", "x", "y"])
    assert "Kaggle Dice" not in bare and "mIoU" in bare


def test_matches_sklearn_on_random_data():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    label = rng.integers(0, 5, size=(4, 16, 16))
    label[rng.random(label.shape) < 0.05] = 255
    pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, 5, size=label.shape))
    pred[label == 255] = rng.integers(0, 5, size=int((label == 255).sum()))
    keep = label != 255
    y_true, y_pred = label[keep], pred[keep]

    cm = confusion_matrix(pred, label, 5)
    np.testing.assert_array_equal(cm, sk.confusion_matrix(y_true, y_pred, labels=range(5)))
    s = segmentation_scores(cm)
    p, r, f, _ = sk.precision_recall_fscore_support(
        y_true, y_pred, labels=range(5), zero_division=np.nan
    )
    np.testing.assert_allclose(s["precision"], p)
    np.testing.assert_allclose(s["recall"], r)
    np.testing.assert_allclose(s["f1"], f)
    iou = sk.jaccard_score(y_true, y_pred, labels=range(5), average=None)
    np.testing.assert_allclose(s["iou"], iou)
    assert s["kappa"] == pytest.approx(sk.cohen_kappa_score(y_true, y_pred))
    assert s["pixel_accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
