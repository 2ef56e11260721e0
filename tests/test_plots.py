"""Figures build, save as readable PNGs, and show the right numbers."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from steel_seg.plots import (
    CLASS_COLOURS,
    IGNORE_COLOUR,
    confusion_matrix_figure,
    overlay,
    overlays_figure,
    training_curves,
)

NAMES = ["background", "defect_1", "defect_2", "defect_3", "defect_4"]


def saved_png(fig: Figure, path) -> tuple[int, int]:
    fig.savefig(path, dpi=80)
    with Image.open(path) as image:
        image.load()
        return image.size


def history(epochs: int = 6) -> list[dict]:
    records = []
    for e in range(1, epochs + 1):
        record = {"epoch": e, "train_loss": 1.0 / e, "lr": 0.01 * (1 - (e - 1) / epochs) ** 0.9, "loss_ce": 0.8 / e}
        if e % 2 == 0:
            record["val_iou"] = [0.9, 0.1 * e, float("nan"), 0.05 * e, None]
            record["val_miou"] = 0.4 + 0.01 * e
        records.append(record)
    return records


def test_training_curves_has_loss_lr_and_iou_panels(tmp_path):
    records = history()
    records[0]["class_names"] = NAMES
    fig = training_curves(records)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    loss_ax, lr_ax, val_ax = fig.axes
    assert [t.get_text() for t in val_ax.get_legend().get_texts()] == [*NAMES, "mIoU"]
    miou_line = val_ax.get_lines()[-1]
    assert list(miou_line.get_xdata()) == [2, 4, 6]
    assert np.allclose(miou_line.get_ydata(), [0.42, 0.44, 0.46])
    width, height = saved_png(fig, tmp_path / "curves.png")
    assert width > 800 and height > 200


def test_training_curves_takes_class_names_argument_and_empty_history(tmp_path):
    fig = training_curves(history(), class_names=["bg", "a", "b", "c", "d"])
    assert [t.get_text() for t in fig.axes[2].get_legend().get_texts()][:2] == ["bg", "a"]
    empty = training_curves([])
    assert len(empty.axes) == 3
    assert saved_png(empty, tmp_path / "empty.png")[0] > 800


def test_confusion_matrix_is_row_normalised_with_counts(tmp_path):
    cm = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    fig = confusion_matrix_figure(cm, ["background", "scratch", "pit"])
    assert len(fig.axes) == 2  # heatmap + colour bar
    heat = fig.axes[0].images[0].get_array()
    assert np.allclose(heat[:2].filled(np.nan), [[0.8, 0.2, 0.0], [0.25, 0.75, 0.0]])
    assert heat.mask[2].all(), "a class with no pixels has no shares, not zeros"
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[:5] == ["8\n80.0%", "2\n20.0%", "0\n0.0%", "1\n25.0%", "3\n75.0%"]
    assert texts[-1] == "0"
    width, height = saved_png(fig, tmp_path / "cm.png")
    assert width > 300 and height > 300


def test_confusion_matrix_checks_size_against_names():
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*3 class names"):
        confusion_matrix_figure([[1, 0], [0, 1]], ["a", "b", "c"])


def strips(n: int, height: int = 64, width: int = 400):
    rng = np.random.default_rng(0)
    images = [rng.integers(80, 160, (height, width, 3), dtype=np.uint8) for _ in range(n)]
    labels, preds = [], []
    for i in range(n):
        label = np.zeros((height, width), np.uint8)
        label[10:30, 20:120] = 1 + i % 4
        pred = label.copy()
        pred[:4] = 255
        labels.append(label)
        preds.append(pred)
    return images, labels, preds


@pytest.mark.parametrize("size", [(64, 400), (64, 64)], ids=["wide_strip", "square"])
def test_overlays_figure_three_panels_per_sample(tmp_path, size):
    images, labels, preds = strips(3, *size)
    fig = overlays_figure(images, labels, preds, NAMES, titles=["a.jpg", "b.jpg", "c.jpg"])
    assert len(fig.axes) == 9
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["defect_1", "defect_2", "defect_3", "defect_4", "ignore (255)"]
    width, height = saved_png(fig, tmp_path / "overlays.png")
    assert width > 400 and height > 400


def test_wide_strips_keep_their_width():
    images, labels, preds = strips(2)
    fig = overlays_figure(images, labels, preds, NAMES)
    box = fig.axes[0].get_window_extent()
    # Drawn at least as wide as the strip's own pixels, so thin defects stay visible.
    assert box.width >= 400 * 0.95 * fig.dpi / 100


def test_overlay_paints_classes_and_ignore_only():
    image = np.full((4, 6, 3), 100, np.uint8)
    mask = np.zeros((4, 6), np.uint8)
    mask[0, 0], mask[1, 1] = 3, 255
    out = overlay(image, mask, alpha=0.5)
    assert (out[2:] == 100).all(), "background stays the image"
    assert np.array_equal(out[1, 1], IGNORE_COLOUR)
    assert np.array_equal(out[0, 0], np.round(0.5 * 100 + 0.5 * CLASS_COLOURS[3].astype(float)))


def test_overlays_figure_names_the_sample_with_a_wrong_shape():
    images, labels, preds = strips(2)
    preds[1] = preds[1][:, :200]
    with pytest.raises(ValueError, match="sample 1"):
        overlays_figure(images, labels, preds, NAMES)
