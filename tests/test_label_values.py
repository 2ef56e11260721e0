"""Masks stored as 0/255 (and with soft edges) are recognised, and made trainable by config."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from steel_seg.config import load_experiment
from steel_seg.config.schema import DataConfig
from steel_seg.data.check import check_dataset, format_report
from steel_seg.data.errors import BadSampleError
from steel_seg.data.label_values import LabelMapping, diagnose_label_values
from steel_seg.data.prepare import prepare_data

SHAPE = (32, 64)  # H, W


def _defect(index: int) -> np.ndarray:
    """A filled ellipse per image, at a different place each time; True = defect."""
    mask = np.zeros(SHAPE, np.uint8)
    cv2.ellipse(mask, (10 + 4 * index, 16), (8, 6), 0, 0, 360, 255, -1)
    return mask > 0


def write_binary_set(root: Path, n: int = 12, soft: bool = False, sizes=None) -> dict[str, np.ndarray]:
    """A PaddleX SEG set whose masks are 0/255 (soft: anti-aliased edges); returns the true defect masks."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    truth, lines = {}, []
    for i in range(n):
        shape = sizes[i] if sizes else SHAPE
        defect = _defect(i) if not sizes else np.zeros(shape, bool)
        image = rng.integers(80, 160, (*shape, 3), dtype=np.uint8)
        image[defect] = 30
        cv2.imwrite(str(root / "JPEGImages" / f"{i:03d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        mask = defect.astype(np.uint8) * 255
        if soft:  # what a drawing tool's anti-aliasing leaves at the edges
            mask = cv2.GaussianBlur(mask, (5, 5), 1.0)
        cv2.imwrite(str(root / "Annotations" / f"{i:03d}.png"), mask)
        truth[f"{i:03d}"] = (mask >= 128) if soft else defect
        lines.append(f"JPEGImages/{i:03d}.jpg Annotations/{i:03d}.png")
    (root / "labels.txt").write_text("background\ndefect\n")
    (root / "train_list.txt").write_text("\n".join(lines[: n - 4]) + "\n")
    (root / "val_list.txt").write_text("\n".join(lines[n - 4:]) + "\n")
    return truth


def test_mapping_applies_threshold_then_map():
    label = np.array([[0, 1, 127, 128, 200, 255]], np.uint8)
    assert LabelMapping(threshold=128).apply(label).tolist() == [[0, 0, 0, 1, 1, 1]]
    assert LabelMapping(((255, 1),)).apply(label).tolist() == [[0, 1, 127, 128, 200, 1]]
    assert LabelMapping(((1, 3),), threshold=128).apply(label).tolist() == [[0, 0, 0, 3, 3, 3]]
    assert LabelMapping().apply(label) is label and LabelMapping().key() == "raw"
    assert LabelMapping(((255, 1),)).key() != LabelMapping(threshold=128).key()


def test_diagnosis_of_value_histograms():
    counts = np.zeros(256, np.int64)
    counts[0], counts[255] = 900, 100
    assert diagnose_label_values(counts, 2).pattern == "binary_0_255"
    soft = counts.copy()
    soft[[40, 90, 180]] = 5
    found = diagnose_label_values(soft, 2)
    assert found.pattern == "soft_0_255" and "mask_threshold: 128" in found.message
    ids = np.zeros(256, np.int64)
    ids[[0, 1, 2, 7]] = 10
    assert "7" in diagnose_label_values(ids, 5 - 2).message and diagnose_label_values(ids, 8) is None


@pytest.mark.parametrize("soft", [False, True])
def test_check_names_the_pattern_and_the_fix(tmp_path, soft):
    write_binary_set(tmp_path / "set", soft=soft)
    report = check_dataset(tmp_path / "set", progress=False)
    text = format_report(report, size=(64, 32))
    fix = "data.mask_threshold: 128" if soft else "data.label_map: {255: 1}"
    why = "soft (anti-aliased) edges" if soft else "255 means *ignore*"
    assert len(report.problems) == 1 and fix in text and why in text
    assert len(text.splitlines()) < 25  # one problem line for all files, not one per file

    # With the fix the check is clean and the defect class is counted.
    mapping = LabelMapping(threshold=128) if soft else LabelMapping(((255, 1),))
    fixed = check_dataset(tmp_path / "set", progress=False, mapping=mapping)
    assert fixed.problems == [] and fixed.images_per_class[1] == 12


def test_soft_masks_without_the_fix_are_a_clear_training_error(tmp_path):
    write_binary_set(tmp_path / "set", soft=True)
    with pytest.raises(BadSampleError, match="mask_threshold"):
        prepare_data(DataConfig(root=tmp_path / "set", work_dir=tmp_path / "work", size=(64, 32)), progress=False)


@pytest.mark.parametrize("soft", [False, True])
def test_the_cache_holds_the_mapped_classes(tmp_path, soft):
    truth = write_binary_set(tmp_path / "set", soft=soft)
    fix = {"mask_threshold": 128} if soft else {"label_map": {255: 1}}
    data = prepare_data(DataConfig(root=tmp_path / "set", work_dir=tmp_path / "work", size=(64, 32), **fix), progress=False)
    for sample in data.train + data.val:
        label = np.asarray(data.cache.labels[data.cache.index_of(sample)])
        assert set(np.unique(label)) <= {0, 1}
        np.testing.assert_array_equal(label == 1, truth[sample.image.stem])
        np.testing.assert_array_equal(data.read_label(sample) == 1, truth[sample.image.stem])
    raw = prepare_data(DataConfig(root=tmp_path / "set", work_dir=tmp_path / "work", size=(64, 32)), progress=False) if not soft else None
    if raw is not None:  # unmapped 0/255 is a different cache, where defects are 'ignore'
        assert raw.cache.directory != data.cache.directory
        assert 255 in np.unique(np.asarray(raw.cache.labels))


def test_check_on_200_images_of_random_sizes_fits_in_40_lines(tmp_path):
    rng = np.random.default_rng(1)
    sizes = [(int(rng.integers(24, 400)), int(rng.integers(24, 400))) for _ in range(200)]
    write_binary_set(tmp_path / "set", n=200, sizes=sizes)
    text = format_report(check_dataset(tmp_path / "set", progress=False), size=(400, 64))
    print(text)
    lines = text.splitlines()
    assert len(lines) <= 40
    assert f"{len(set(sizes))} distinct sizes over 200 images" in text
    assert "most common: none: every image has its own size" in text and "aspect ratio (width/height)" in text and "distorting shapes by" in text


@pytest.mark.slow
def test_a_soft_mask_set_trains_with_mask_threshold(tmp_path):
    write_binary_set(tmp_path / "set", soft=True)
    config = {
        "name": "soft",
        "data": {"root": str(tmp_path / "set"), "work_dir": str(tmp_path / "work"), "size": [64, 32],
                 "fallback_to_demo": False, "mask_threshold": 128},
        "model": {"type": "FastSCNN"},
        "train": {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 2, "output_dir": str(tmp_path / "out")},
        "eval": {"num_overlays": 0},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "soft"},
    }
    (tmp_path / "soft.yaml").write_text(yaml.safe_dump(config))
    from steel_seg.experiment import run_experiment

    result = run_experiment(load_experiment(tmp_path / "soft.yaml"), progress=False)
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["data.mask_threshold"] == "128"
    assert "final_val_iou_defect" in run.data.metrics
