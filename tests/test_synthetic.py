"""The synthetic Severstal-style data: format, determinism, class balance, and that it is hard."""

from __future__ import annotations

import csv
import re

import cv2
import numpy as np
import pytest
from PIL import Image

from steel_seg.data.rle import rle_decode
from steel_seg.data.synthetic import (
    CLASS_NAMES,
    choose_classes,
    generate_dataset,
    image_id,
    render_indexed_sample,
    render_sample,
)

SMALL = dict(width=400, height=64)


def _read_rows(root):
    with open(root / "train.csv", newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def _files(root):
    paths = [root / "train.csv", *sorted((root / "train_images").iterdir())]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in paths}


def _is_gray(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "demo"
    return generate_dataset(root, num_images=24, seed=3, **SMALL)


def test_class_names_are_indexed_by_class_id():
    assert CLASS_NAMES == ("background", "pits", "lines", "scratches", "blotches")


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(small_dataset, tmp_path):
    again = generate_dataset(tmp_path / "again", num_images=24, seed=3, **SMALL)
    other = generate_dataset(tmp_path / "other", num_images=24, seed=4, **SMALL)
    first = _files(small_dataset)
    assert _files(again) == first
    other_files = _files(other)
    assert other_files["train.csv"] != first["train.csv"]
    assert all(other_files[name] != data for name, data in first.items() if name.endswith(".jpg"))


def test_an_image_does_not_depend_on_how_many_are_generated(small_dataset, tmp_path):
    fewer = generate_dataset(tmp_path / "fewer", num_images=5, seed=3, **SMALL)
    for index in range(5):
        name = f"train_images/{image_id(index)}"
        assert (fewer / name).read_bytes() == (small_dataset / name).read_bytes()


def test_csv_rows_decode_to_the_generated_label_maps(small_dataset):
    rows = _read_rows(small_dataset)
    assert rows[0] == ["ImageId", "ClassId", "EncodedPixels"]
    masks: dict[str, dict[int, np.ndarray]] = {}
    for line, (name, class_id, rle) in enumerate(rows[1:], start=2):
        assert re.fullmatch(r"syn_\d{5}\.jpg", name), name
        assert class_id in {"1", "2", "3", "4"}
        assert rle, f"train.csv line {line}: a listed class must have pixels"
        masks.setdefault(name, {})[int(class_id)] = rle_decode(rle, (64, 400), f"line {line}")

    images = sorted(p.name for p in (small_dataset / "train_images").iterdir())
    assert images == [image_id(i) for i in range(24)]
    assert set(masks) <= set(images)
    for index, name in enumerate(images):
        _, labels = render_indexed_sample(3, index, **SMALL)
        expected = {c: labels == c for c in range(1, 5) if (labels == c).any()}
        decoded = masks.get(name, {})  # no rows: a defect-free image
        assert decoded.keys() == expected.keys(), name
        for class_id, mask in decoded.items():
            np.testing.assert_array_equal(mask, expected[class_id], err_msg=f"{name} class {class_id}")
    assert 0 < len(masks) < 24, "expected both defect-free images and images with defects"


def test_written_images_match_rendered_pixels_up_to_jpeg_loss(small_dataset):
    for index in (0, 1, 2):
        image, _ = render_indexed_sample(3, index, **SMALL)
        written = cv2.imread(str(small_dataset / "train_images" / image_id(index)))
        assert np.abs(written.astype(int) - image.astype(int)).mean() < 3


def test_masks_of_different_classes_never_overlap():
    for i in range(10):
        _, labels = render_sample(np.random.default_rng([11, i]), **SMALL, classes={1, 2, 3, 4})
        # A label map holds one class per pixel; check that clipping did not erase a class.
        present = {int(c) for c in np.unique(labels)} - {0}
        assert len(present) >= 3, f"draw {i}: only classes {present} survived placement"


def test_csv_masks_of_one_image_are_disjoint(tmp_path):
    root = generate_dataset(tmp_path / "mixed", num_images=12, seed=5, defect_free_fraction=0.0, **SMALL)
    per_image: dict[str, np.ndarray] = {}
    for name, _, rle in _read_rows(root)[1:]:
        mask = rle_decode(rle, (64, 400))
        seen = per_image.setdefault(name, np.zeros_like(mask))
        assert not (seen & mask).any(), f"{name}: two classes share pixels"
        seen |= mask
    assert len(per_image) == 12  # defect_free_fraction=0: every image has a defect


def test_class_frequencies_look_like_severstal():
    draws = [choose_classes(np.random.default_rng([21, i])) for i in range(2000)]
    with_defects = [c for c in draws if c]
    counts = {k: sum(k in c for c in with_defects) for k in range(1, 5)}
    assert 0.45 < 1 - len(with_defects) / len(draws) < 0.55
    assert counts[3] > max(counts[1], counts[4])
    assert min(counts[1], counts[4]) > counts[2] > 0
    assert 0.62 < counts[3] / len(with_defects) < 0.82
    assert any(len(c) == 2 for c in with_defects)
    # render_sample without `classes` draws them the same way.
    labels = [render_sample(np.random.default_rng([21, i]), **SMALL)[1] for i in range(40)]
    free = sum(not lab.any() for lab in labels)
    assert 10 <= free <= 30


def test_the_demo_mix_keeps_severstals_order_with_every_class_common():
    draws = [choose_classes(np.random.default_rng([22, i]), class_mix="moderate") for i in range(2000)]
    with_defects = [c for c in draws if c]
    shares = {k: sum(k in c for c in with_defects) / len(with_defects) for k in range(1, 5)}
    assert shares[3] > max(shares[1], shares[4]) and min(shares[1], shares[4]) > shares[2]
    assert shares[2] > 0.12, shares  # the rarest class still has enough images to be learned
    with pytest.raises(ValueError, match="unknown class_mix 'even'"):
        choose_classes(np.random.default_rng(0), class_mix="even")


def test_defaults_are_gray_1600x256_three_channel_jpegs(tmp_path):
    image, labels = render_sample(np.random.default_rng(0))
    assert image.shape == (256, 1600, 3) and image.dtype == np.uint8
    assert labels.shape == (256, 1600) and labels.dtype == np.uint8
    assert _is_gray(image)
    root = generate_dataset(tmp_path / "full", num_images=2)
    for index in range(2):
        path = root / "train_images" / image_id(index)
        with Image.open(path) as pil:
            assert pil.format == "JPEG" and pil.mode == "RGB" and pil.size == (1600, 256)
            assert _is_gray(np.asarray(pil))
        assert _is_gray(cv2.imread(str(path)))


def _components(mask):
    count, components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return [components == k for k in range(1, count)]


def _elongation(region):
    ys, xs = np.nonzero(region)
    spread = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
    return float(np.sqrt(spread[1] / max(spread[0], 1e-3)))


def test_each_class_has_its_own_shape():
    area, elongation = {}, {}
    for class_id in range(1, 5):
        regions = []
        for i in range(6):
            _, labels = render_sample(np.random.default_rng([9, class_id, i]), 800, 128, {class_id})
            regions += [r for r in _components(labels == class_id) if r.sum() >= 5]
        area[class_id] = np.median([r.sum() for r in regions])
        elongation[class_id] = np.median([_elongation(r) for r in regions])
    # Pits are small round dots, lines long and thin, scratch patches long, blotches big and round.
    assert area[1] < area[2] < min(area[3], area[4])
    assert elongation[1] < 2 and elongation[4] < 3
    # Labels are annotator-style regions (a band around each crack), so lines are less thin
    # than their pixels (and wide enough to survive the demo's 200x32), but still the most elongated class.
    assert elongation[2] > 1.15 * elongation[3] and elongation[3] > 1.5 * elongation[4]


def _best_threshold_iou(image, labels):
    """IoU with the defect pixels of the best `gray < t` or `gray > t` on the smoothed image."""
    gray = cv2.GaussianBlur(image[..., 0].astype(np.float32), (0, 0), 1.5)
    defect = labels > 0
    best = 0.0
    for t in np.percentile(gray, np.arange(1, 100)):
        for guess in (gray < t, gray > t):
            best = max(best, (guess & defect).sum() / (guess | defect).sum())
    return best


def test_a_brightness_threshold_cannot_find_the_defects():
    ious = []
    for i in range(10):
        rng = np.random.default_rng([13, i])
        ious.append(_best_threshold_iou(*render_sample(rng, **SMALL, classes=choose_classes(rng, 0.0))))
    assert np.mean(ious) < 0.3, ious
    # The dark blotches are the class a threshold comes closest to; still not good enough.
    blotches = [
        _best_threshold_iou(*render_sample(np.random.default_rng([14, i]), **SMALL, classes={4}))
        for i in range(8)
    ]
    assert np.mean(blotches) < 0.4, blotches


def test_scratches_differ_in_texture_not_only_brightness():
    inside, outside = [], []
    for i in range(8):
        image, labels = render_sample(np.random.default_rng([15, i]), **SMALL, classes={3})
        gray = image[..., 0].astype(np.float32)
        detail = np.abs(gray - cv2.GaussianBlur(gray, (0, 0), 2))
        inside.append(detail[labels == 3].mean())
        outside.append(detail[labels == 0].mean())
    assert np.mean(inside) > 1.2 * np.mean(outside)


def test_refuses_to_overwrite_without_being_asked(tmp_path):
    root = generate_dataset(tmp_path / "d", num_images=4, seed=0, **SMALL)
    with pytest.raises(FileExistsError, match=re.escape(str(root / "train.csv"))):
        generate_dataset(root, num_images=2, **SMALL)
    generate_dataset(root, num_images=2, seed=1, overwrite=True, **SMALL)
    names = sorted(p.name for p in (root / "train_images").iterdir())
    assert names == [image_id(0), image_id(1)], "stale images from the larger run were left"


def test_progress_bar(tmp_path, capsys):
    generate_dataset(tmp_path / "p", num_images=2, progress=True, **SMALL)
    assert "synthetic images" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_images=-1), "num_images"),
        (dict(defect_free_fraction=1.5), "defect_free_fraction"),
        (dict(width=10), "at least"),
    ],
)
def test_bad_arguments_are_explained(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path / "bad", **{**SMALL, **kwargs})


def test_unknown_class_is_explained():
    with pytest.raises(ValueError, match="unknown defect classes"):
        render_sample(np.random.default_rng(0), **SMALL, classes={5})
