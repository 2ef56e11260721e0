import subprocess
import sys

import cv2
import numpy as np

from steel_seg.data.check import check_dataset, format_report
from steel_seg.data.prepare import convert_kaggle


def test_check_counts_classes_and_pixels(tiny_kaggle):
    root, truth = tiny_kaggle
    report = check_dataset(root, progress=False)
    assert report.num_images == 6 and report.num_defect_free == 2
    assert report.images_per_class == {1: 1, 2: 1, 3: 2, 4: 1}
    total = 6 * 32 * 64
    expected_3 = sum(int((label == 3).sum()) for label in truth.values())
    assert abs(report.pixel_share(3) - expected_3 / total) < 1e-12
    text = format_report(report)
    assert "defect-free: 2 (33.3%)" in text and "problems: none" in text


def test_check_reports_unreadable_and_mismatched_sizes(tiny_kaggle):
    root, _ = tiny_kaggle
    (root / "train_images" / "f.jpg").write_bytes(b"")
    cv2.imwrite(str(root / "train_images" / "d.jpg"), np.zeros((40, 64, 3), np.uint8))
    report = check_dataset(root, progress=False)
    assert [p for p, _ in report.problems] == [str(root / "train_images" / "f.jpg")]
    assert report.sizes == {(64, 32): 4, (64, 40): 1}
    text = format_report(report, size=(64, 32))
    assert "2 distinct sizes over 5 images" in text and "most common: 64x32 (4), 64x40 (1)" in text
    assert "f.jpg: unreadable image" in text


def test_check_agrees_between_kaggle_and_converted_layout(tiny_kaggle, tmp_path):
    root, _ = tiny_kaggle
    convert_kaggle(root, tmp_path / "seg", progress=False)
    a, b = check_dataset(root, progress=False), check_dataset(tmp_path / "seg", progress=False)
    assert (a.num_images, a.num_defect_free, a.images_per_class) == (b.num_images, b.num_defect_free, b.images_per_class)
    assert a.pixels_per_class == b.pixels_per_class


def test_check_command_exit_codes(tiny_kaggle, tmp_path):
    root, _ = tiny_kaggle
    ok = subprocess.run([sys.executable, "-m", "steel_seg.data", "check", str(root), "--quiet"], capture_output=True, text=True)
    assert ok.returncode == 0 and "images:  6" in ok.stdout
    missing = subprocess.run([sys.executable, "-m", "steel_seg.data", "check", str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 2 and "neither a Kaggle folder" in missing.stderr
