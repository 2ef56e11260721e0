"""Deploy post-processing: softmax, upsampling, thresholds and minimum areas, the tuner, submissions."""

from __future__ import annotations

import ast
import csv
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from steel_seg.data.rle import rle_decode
from steel_seg.deploy.postprocess import argmax_classes, probs_to_mask, softmax, upsample_probs
from steel_seg.deploy.submission import submission_rows, write_submission
from steel_seg.deploy.tune import PostprocessTuner

DEPLOY = Path(__file__).resolve().parents[1] / "steel_seg" / "deploy"


def background_probs(num_classes: int, shape) -> np.ndarray:
    probs = np.full((num_classes, *shape), 0.05, dtype=np.float32)
    probs[0] = 0.9
    return probs


def paint(probs: np.ndarray, c: int, where, p: float, rest: float | None = None) -> None:
    """Make class c win at `where` with probability p; other classes share the rest."""
    others = [k for k in range(probs.shape[0]) if k != c]
    share = (1.0 - p) / len(others) if rest is None else rest
    for k in others:
        probs[k][where] = share
    probs[c][where] = p


# --- probs_to_mask -----------------------------------------------------------------------------


def diagonal_component(length: int, shape=(12, 12), start=(2, 2)) -> np.ndarray:
    # Diagonal neighbours only: one component under 8-connectivity, `length` under 4.
    where = np.zeros(shape, bool)
    for i in range(length):
        where[start[0] + i, start[1] + i] = True
    return where


@pytest.mark.parametrize("min_area, kept", [(5, True), (6, False), (0, True), (1, True)])
def test_min_area_removes_small_8_connected_components(min_area, kept):
    probs = background_probs(3, (12, 12))
    blob = diagonal_component(5)
    paint(probs, 1, blob, 0.8)
    mask = probs_to_mask(probs, thresholds=[0, 0, 0], min_areas=[0, min_area, 0])
    assert mask.dtype == np.uint8 and mask.shape == (12, 12)
    assert (mask[blob] == (1 if kept else 0)).all()
    assert (mask[~blob] == 0).all()


def test_min_area_is_per_class_and_per_component():
    probs = background_probs(3, (16, 16))
    small = np.zeros((16, 16), bool)
    small[1:3, 1:3] = True  # 4 px
    large = np.zeros((16, 16), bool)
    large[8:12, 8:12] = True  # 16 px
    other = np.zeros((16, 16), bool)
    other[1:3, 10:12] = True  # 4 px of class 2
    paint(probs, 1, small, 0.8)
    paint(probs, 1, large, 0.8)
    paint(probs, 2, other, 0.8)
    mask = probs_to_mask(probs, min_areas=[0, 5, 0])
    assert (mask[small] == 0).all() and (mask[large] == 1).all() and (mask[other] == 2).all()


def test_pixel_below_threshold_goes_to_background_not_second_best():
    probs = background_probs(3, (4, 4))
    probs[:, 1, 1] = [0.2, 0.45, 0.35]  # class 1 wins but is under its 0.5 threshold
    probs[:, 2, 2] = [0.1, 0.6, 0.3]  # class 1 above its threshold
    probs[:, 3, 3] = [0.3, 0.3, 0.4]  # class 2, threshold 0 for class 2
    mask = probs_to_mask(probs, thresholds=[0.0, 0.5, 0.0])
    assert mask[1, 1] == 0
    assert mask[2, 2] == 1
    assert mask[3, 3] == 2


def test_threshold_applies_before_min_area():
    probs = background_probs(2, (10, 10))
    blob = np.zeros((10, 10), bool)
    blob[2:5, 2:5] = True  # 9 px, of which 3 are unsure
    paint(probs, 1, blob, 0.9)
    probs[:, 2, 2:5] = [[0.4], [0.6]]
    # 6 confident pixels remain after the threshold, so a 7-pixel minimum removes them all.
    assert (probs_to_mask(probs, thresholds=[0, 0.7], min_areas=[0, 7]) == 0).all()
    kept = probs_to_mask(probs, thresholds=[0, 0.7], min_areas=[0, 6])
    assert kept.sum() == 6 and (kept[2, 2:5] == 0).all()


def test_background_threshold_and_area_are_ignored():
    rng = np.random.default_rng(3)
    probs = softmax(rng.normal(size=(1, 4, 20, 30)) * 3)[0]
    expected = np.argmax(probs, axis=0)
    np.testing.assert_array_equal(probs_to_mask(probs, thresholds=[1.0, 0, 0, 0], min_areas=[10**6, 0, 0, 0]), expected)


@pytest.mark.parametrize("layout", ["chw", "hwc_view"])
def test_defaults_equal_np_argmax_including_ties(layout):
    rng = np.random.default_rng(0)
    # Values from {0, .5, 1}: most pixels have ties, which must go to the lowest class id.
    probs = (rng.integers(0, 3, size=(5, 64, 80)) / 2).astype(np.float32)
    if layout == "hwc_view":
        probs = np.ascontiguousarray(probs.transpose(1, 2, 0)).transpose(2, 0, 1)
    expected = np.argmax(probs, axis=0)
    for thresholds, min_areas in [(None, None), ([0.0] * 5, [0] * 5), ([0.0] * 5, [1] * 5)]:
        got = probs_to_mask(probs, thresholds, min_areas)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected)


def test_argmax_matches_numpy_with_nan():
    probs = np.zeros((3, 2, 2), np.float32)
    probs[:, 0, 0] = [0.1, np.nan, 0.9]  # np.argmax picks the first NaN
    probs[:, 1, 1] = [np.nan, 0.5, np.nan]
    np.testing.assert_array_equal(argmax_classes(probs), np.argmax(probs, axis=0))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(thresholds=[0, 0.5]), "thresholds has 2 values"),
        (dict(min_areas=[0, 1, 2, 3]), "min_areas has 4 values"),
        (dict(thresholds=[0, 1.5, 0]), r"thresholds\[1\] = 1.5 is outside \[0, 1\]"),
        (dict(thresholds=[0, -0.1, 0]), "outside"),
        (dict(thresholds=[0, float("nan"), 0]), "outside"),
        (dict(min_areas=[0, -1, 0]), r"min_areas\[1\] = -1 is negative"),
        (dict(min_areas=[0, 2.5, 0]), "not a whole number"),
        (dict(thresholds="0.5"), "sequence"),
    ],
)
def test_invalid_postprocess_settings_are_explained(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        probs_to_mask(background_probs(3, (4, 4)), **kwargs)


def test_probs_must_be_3d():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        probs_to_mask(np.zeros((4, 4), np.float32))


# --- upsample_probs and softmax ----------------------------------------------------------------


def test_upsample_same_size_returns_input():
    probs = np.random.default_rng(0).random((5, 8, 16), dtype=np.float32)
    assert upsample_probs(probs, width=16, height=8) is probs


def test_upsample_known_bilinear_case():
    # Half-pixel centres (cv2 INTER_LINEAR): [0, 1] -> [0, .25, .75, 1]; edges are clamped.
    probs = np.array([[[0.0, 1.0]], [[1.0, 0.0]]], dtype=np.float32)
    out = upsample_probs(probs, width=4, height=2)
    assert out.shape == (2, 2, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], [[0, 0.25, 0.75, 1]] * 2, atol=1e-6)
    np.testing.assert_allclose(out[1], [[1, 0.75, 0.25, 0]] * 2, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 5])
def test_upsample_matches_per_channel_resize(channels):
    probs = np.random.default_rng(1).random((channels, 16, 100), dtype=np.float32)
    out = upsample_probs(probs, width=400, height=64)
    assert out.shape == (channels, 64, 400)
    for c in range(channels):
        expected = cv2.resize(probs[c], (400, 64), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(out[c], expected, atol=1e-6)
    np.testing.assert_array_equal(probs_to_mask(out), np.argmax(out, axis=0))


def test_softmax_sums_to_one_along_axis():
    logits = np.random.default_rng(2).normal(size=(2, 5, 3, 4))
    probs = softmax(logits)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(softmax(logits[0], axis=0).sum(axis=0), 1.0, rtol=1e-6)


def test_softmax_is_stable_for_large_logits():
    big = np.array([[1000.0, 1001.0, 1002.0], [-1000.0, -1001.0, -1002.0]])
    probs = softmax(big, axis=1)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs[0], softmax(np.array([[0.0, 1.0, 2.0]]))[0], rtol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


# --- tuner ---------------------------------------------------------------------------------------


def kaggle_dice(mask: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Brute-force per-class Dice of one image; label 255 pixels count nowhere."""
    valid = label != 255
    scores = []
    for c in range(1, num_classes):
        pred = (mask == c) & valid
        truth = label == c
        total = int(pred.sum() + truth.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total)
    return scores


def score_dataset(samples, thresholds, min_areas, num_classes) -> np.ndarray:
    """Mean per-class Dice over images after probs_to_mask."""
    per_image = [kaggle_dice(probs_to_mask(p, thresholds, min_areas), y, num_classes) for p, y in samples]
    return np.mean(per_image, axis=0)


def constructed_samples():
    """Class 1: small confident false blobs (min area fixes them); class 2: an unsure false region."""
    shape = (32, 64)
    samples = []

    probs = background_probs(3, shape)
    label = np.zeros(shape, np.uint8)
    label[4:13, 4:21] = 1  # 153 px
    paint(probs, 1, label == 1, 0.9)
    for r, col in [(20, 5), (26, 12), (2, 30)]:
        paint(probs, 1, (slice(r, r + 2), slice(col, col + 2)), 0.8)  # 4 px false positives
    label[20:29, 30:51] = 2  # 189 px
    paint(probs, 2, label == 2, 0.9)
    paint(probs, 2, (slice(2, 11), slice(40, 61)), 0.4, rest=0.3)  # class 2 wins at 0.4
    label[:, 60:] = 255  # ignored columns cut through the unsure region
    samples.append((probs, label))

    probs = background_probs(3, shape)
    label = np.zeros(shape, np.uint8)
    paint(probs, 1, (slice(10, 12), slice(10, 12)), 0.8)
    samples.append((probs, label))
    return samples


def brute_force_best(samples, thresholds, min_areas, num_classes):
    """Per class, the first best (threshold, area) in ascending order, scored through probs_to_mask."""
    best = {}
    for t in thresholds:
        for a in min_areas:
            scores = score_dataset(samples, [t] * num_classes, [a] * num_classes, num_classes)
            for c in range(1, num_classes):
                if c not in best or scores[c - 1] > best[c][0]:
                    best[c] = (scores[c - 1], t, a)
    return best


def test_tuner_picks_the_known_best_values_and_matches_brute_force():
    samples = constructed_samples()
    tuner = PostprocessTuner(3)
    for probs, label in samples:
        tuner.update(probs, label)
    result = tuner.result()

    assert result.images == 2
    assert result.thresholds == [0.0, 0.0, 0.5]
    assert result.min_areas == [0, 64, 0]
    assert result.dice_after > result.dice_before

    before = score_dataset(samples, None, None, 3)
    after = score_dataset(samples, result.thresholds, result.min_areas, 3)
    assert result.per_class_before == pytest.approx(before.tolist(), abs=1e-12)
    assert result.per_class_after == pytest.approx(after.tolist(), abs=1e-12)
    assert result.dice_before == pytest.approx(before.mean(), abs=1e-12)
    assert result.dice_after == pytest.approx(after.mean(), abs=1e-12)
    assert result.per_class_after == [1.0, 1.0]
    for i, t in enumerate(tuner.thresholds):
        for j, a in enumerate(tuner.min_areas):
            expected = score_dataset(samples, [t] * 3, [a] * 3, 3)
            np.testing.assert_allclose(tuner.table()[:, i, j], expected, atol=1e-12)


def random_samples(seed: int, count: int, num_classes: int = 4, shape=(24, 40)):
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        logits = rng.normal(size=(num_classes, *shape)).astype(np.float32)
        logits = np.stack([cv2.GaussianBlur(x, (0, 0), 2.0) for x in logits]) * 8
        logits[0] += 1.0  # background usually wins, defects form blobs of many sizes
        probs = softmax(logits, axis=0)
        label = np.argmax(logits + rng.normal(size=logits.shape).astype(np.float32) * 2, axis=0).astype(np.uint8)
        label[rng.random(shape) < 0.05] = 255
        samples.append((probs, label))
    return samples


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tuner_matches_brute_force_on_random_maps(seed):
    samples = random_samples(seed, count=6)
    thresholds, min_areas = (0.0, 0.4, 0.5, 0.6), (0, 3, 10, 40)
    tuner = PostprocessTuner(4, thresholds=thresholds, min_areas=min_areas)
    for probs, label in samples:
        tuner.update(probs, label)
    result = tuner.result()

    table = tuner.table()
    for i, t in enumerate(thresholds):
        for j, a in enumerate(min_areas):
            expected = score_dataset(samples, [t] * 4, [a] * 4, 4)
            np.testing.assert_allclose(table[:, i, j], expected, atol=1e-12, err_msg=f"threshold {t}, min area {a}")

    best = brute_force_best(samples, thresholds, min_areas, 4)
    for c in range(1, 4):
        score, t, a = best[c]
        assert (result.thresholds[c], result.min_areas[c]) == (t, a)
        assert result.per_class_after[c - 1] == pytest.approx(score, abs=1e-12)
    after = score_dataset(samples, result.thresholds, result.min_areas, 4)
    assert result.dice_after == pytest.approx(after.mean(), abs=1e-12)
    assert result.dice_before == pytest.approx(score_dataset(samples, None, None, 4).mean(), abs=1e-12)


def test_tuner_returns_plain_argmax_when_nothing_helps():
    # Confident, exact predictions: any threshold or minimum area can only lose pixels.
    tuner = PostprocessTuner(3)
    for seed in range(3):
        label = np.zeros((32, 64), np.uint8)
        label[5:15, 5 + seed : 40] = 1
        label[20:30, 45:60] = 2
        probs = background_probs(3, label.shape)
        paint(probs, 1, label == 1, 0.95)
        paint(probs, 2, label == 2, 0.95)
        tuner.update(probs, label)
    tuner.update(background_probs(3, (32, 64)), np.zeros((32, 64), np.uint8))  # empty image
    result = tuner.result()
    assert result.thresholds == [0.0, 0.0, 0.0]
    assert result.min_areas == [0, 0, 0]
    assert result.dice_before == result.dice_after == 1.0


def test_tuner_rejects_bad_input():
    tuner = PostprocessTuner(3)
    with pytest.raises(ValueError, match="no images"):
        tuner.result()
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        tuner.update(background_probs(4, (4, 4)), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        tuner.update(background_probs(3, (4, 4)), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        PostprocessTuner(3, thresholds=(0.5, 1.2))


# --- submission ----------------------------------------------------------------------------------


def test_submission_rows_decode_back_to_the_mask(tmp_path):
    rng = np.random.default_rng(4)
    shape = (32, 48)
    masks = {}
    mask = np.zeros(shape, np.uint8)
    mask[rng.random(shape) < 0.3] = 1
    mask[4:10, 20:40] = 3
    masks["a.jpg"] = mask  # class 2 and 4 absent
    masks["b.jpg"] = np.zeros(shape, np.uint8)

    rows = []
    for image_id, m in masks.items():
        image_rows = submission_rows(image_id, m, [1, 2, 3, 4])
        assert [(r[0], r[1]) for r in image_rows] == [(image_id, c) for c in (1, 2, 3, 4)]
        for _, c, rle in image_rows:
            assert np.array_equal(rle_decode(rle, shape), m == c)
            assert (rle == "") == (not (m == c).any())
        rows += image_rows
    assert rows[1][2] == "" and rows[3][2] == "" and rows[0][2] != ""

    path = write_submission(tmp_path / "sub" / "submission.csv", rows)
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["ImageId", "ClassId", "EncodedPixels"]
    assert len(table) == 1 + 4 * len(masks)
    assert table[1:] == [[i, str(c), rle] for i, c, rle in rows]
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temp file left


def test_write_submission_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("old\n")

    def broken_rows():
        yield ("a.jpg", 1, "1 2")
        raise RuntimeError("predictor crashed")

    with pytest.raises(RuntimeError):
        write_submission(path, broken_rows())
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


# --- dependencies --------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["postprocess.py", "tune.py", "submission.py"])
def test_deploy_modules_import_only_inference_libraries(module):
    allowed = {"__future__", "numpy", "cv2", "steel_seg.data.rle", "steel_seg.deploy.postprocess"}
    tree = ast.parse((DEPLOY / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    outside = {m for m in imported if m not in allowed and m.split(".")[0] not in sys.stdlib_module_names}
    assert not outside, f"{module} imports {sorted(outside)}"


def test_default_backend_prefers_the_preference_order_among_near_equal_timings():
    from steel_seg.deploy.export import pick_default
    from steel_seg.deploy.spec import BackendCheck

    def checks(**ms):
        return {b: BackendCheck(max_rel_diff=0.0, argmax_agreement=1.0, ms_per_image=v) for b, v in ms.items()}

    # ORT 3% faster at export is noise: OpenVINO (first in the CPU order) stays the default.
    assert pick_default(checks(openvino=33.0, onnxruntime=32.0, onednn=90.0)) == "openvino"
    # Clearly faster wins whatever the order.
    assert pick_default(checks(openvino=50.0, onnxruntime=30.0)) == "onnxruntime"
    assert pick_default(checks(paddle=20.0, onednn=21.0)) == "onednn"
