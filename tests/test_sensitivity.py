"""Sensitivity analysis: features, quintile binning and per-quintile scores on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steel_seg.tta_analysis.sensitivity import (
    FeatureTable, FeatureBin, _nanstd, candidate_views, feature_table, image_features, quantile_bins, tables_csv, tables_markdown,
)

CLASSES = ["background", "pit"]


def test_quintiles_of_distinct_values_are_equal_sized_and_ordered():
    values = [5, 1, 4, 2, 3, 10, 9, 8, 7, 6]
    assert quantile_bins(values).tolist() == [2, 0, 1, 0, 1, 4, 4, 3, 3, 2]
    assert np.bincount(quantile_bins(np.arange(23.0)), minlength=5).tolist() == [5, 5, 4, 5, 4]


def test_equal_values_share_a_quintile_even_if_one_stays_empty():
    values = [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]  # e.g. four images without defect pixels
    assert quantile_bins(values).tolist() == [0, 0, 0, 0, 2, 2, 3, 3, 4, 4]
    assert quantile_bins([7.0] * 6).tolist() == [0] * 6
    with pytest.raises(ValueError, match="NaN"):
        quantile_bins([1.0, math.nan])


def cm(tp, fp, fn, tn=100):
    """A 2-class confusion matrix (rows true) with `tp` etc. counted for the defect class."""
    return np.array([[tn, fp], [fn, tp]])


def test_per_quintile_scores_sum_the_images_confusion_matrices():
    # Ten images, feature 1..10; the defect is found well on low-feature images only.
    matrices = np.stack([cm(9, 1, 0) if i < 4 else cm(1, 4, 5) for i in range(10)])
    table = feature_table("sharpness", np.arange(1.0, 11.0), matrices, CLASSES)
    assert [b.images for b in table.bins] == [2, 2, 2, 2, 2]
    assert [(b.low, b.high) for b in table.bins] == [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)]
    assert table.bins[0].f1[1] == pytest.approx(2 * 18 / (2 * 18 + 2 + 0))
    assert table.bins[0].iou[1] == pytest.approx(18 / 20)
    assert table.bins[4].f1[1] == pytest.approx(2 * 2 / (2 * 2 + 8 + 10))
    f1 = [b.f1[1] for b in table.bins]
    assert table.f1_std[1] == pytest.approx(np.std(f1))  # population std, across quintiles
    # Blurrier (lower sharpness) images score better: the analysis suggests blur, as in seed 000.
    (blur,) = candidate_views([table])
    assert blur.view == "blur" and "lower sharpness" in blur.reason


def test_std_across_quintiles_is_the_seeds():
    # Seed 000's sharpness table: class 0 F1 per quintile and its reported std 0.0643; class 1 0.0523.
    assert _nanstd([0.7929, 0.8816, 0.9363, 0.9462, 0.9751]) == pytest.approx(0.0643, abs=5e-5)
    assert _nanstd([0.8727, 0.7429, 0.7229, 0.7912, 0.7619]) == pytest.approx(0.0523, abs=5e-5)


def table_with(feature, defect_f1):
    bins = [FeatureBin(i, i, i, 2, [0.99, v], [0.98, v / 2]) for i, v in enumerate(defect_f1)]
    return FeatureTable(feature, CLASSES, bins, [0.0, float(np.std(defect_f1))], [0.0, 0.0])


def test_candidates_follow_the_trends_and_flat_features_suggest_nothing():
    tables = [
        table_with("sharpness", [0.5, 0.51, 0.5, 0.51, 0.5]),  # flat: nothing
        table_with("brightness", [0.3, 0.35, 0.4, 0.45, 0.5]),  # better when brighter
        table_with("contrast", [0.6, 0.5, 0.45, 0.4, 0.3]),  # better at low contrast
        table_with("defect_area", [0.2, 0.3, 0.4, 0.5, 0.6]),  # large defects better: zoom in
    ]
    found = candidate_views(tables, training_flips=["hflip"])
    assert [c.view for c in found] == ["brightness:0.1", "contrast:0.8", "scale:1.25", "hflip"]
    assert "trained with hflip" in found[-1].reason
    assert [c.view for c in candidate_views([table_with("sharpness", [0.2, 0.3, 0.4, 0.5, 0.6])])] == []  # no sharpen view


def test_tables_as_markdown_and_csv():
    table = table_with("contrast", [0.6, 0.5, 0.45, 0.4, 0.3])
    md = tables_markdown([table])
    assert "| quintile | contrast | images | F1 background | F1 pit | IoU background | IoU pit |" in md
    assert "| 0-20% |" in md and "| std |" in md
    rows = tables_csv([table]).strip().splitlines()
    assert rows[0] == "feature,quintile,low,high,images,class,f1,iou"
    assert len(rows) == 1 + 5 * 2 + 2


def test_image_features_on_hand_made_images():
    flat = np.full((32, 64, 3), 100, np.uint8)
    checker = (np.indices((32, 64)).sum(axis=0) % 2 * 200).astype(np.uint8)
    checker = np.repeat(checker[:, :, None], 3, axis=2)
    label = np.zeros((32, 64), np.uint8)
    label[:8, :16] = 1
    label[-1, :] = 255  # ignored pixels count for neither side
    f_flat, f_checker = image_features(flat, label), image_features(checker, label)
    assert f_flat["sharpness"] == 0 and f_checker["sharpness"] > 1000
    assert f_flat["brightness"] == pytest.approx(100) and f_checker["brightness"] == pytest.approx(100)
    assert f_flat["contrast"] == 0 and f_checker["contrast"] == pytest.approx(100)
    assert f_flat["defect_area"] == pytest.approx(128 / (32 * 64 - 64))
