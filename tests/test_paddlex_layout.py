import numpy as np
import pytest
from PIL import Image

from steel_seg.data.errors import BadSampleError, DataError
from steel_seg.data.kaggle import open_kaggle_folder
from steel_seg.data.paddlex_layout import open_seg_dataset, read_label_png, read_list, write_label_png
from steel_seg.data.prepare import convert_kaggle


def test_label_png_round_trip_keeps_ids_not_colours(tmp_path):
    label = np.random.default_rng(0).integers(0, 5, size=(16, 40)).astype(np.uint8)
    label[0, :5] = 255
    path = tmp_path / "x.png"
    write_label_png(path, label)
    with Image.open(path) as image:
        assert image.mode == "P"  # palette PNG, as PaddleX writes them
    np.testing.assert_array_equal(read_label_png(path), label)


def test_single_channel_label_png_is_read_too(tmp_path):
    label = np.array([[0, 1], [4, 255]], np.uint8)
    Image.fromarray(label, mode="L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "l.png"), label)


def test_rgb_label_png_is_rejected(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(BadSampleError, match="rgb.png: label PNG has mode RGB"):
        read_label_png(tmp_path / "rgb.png")


def test_kaggle_to_seg_round_trip(tiny_kaggle, tmp_path):
    root, truth = tiny_kaggle
    convert_kaggle(root, tmp_path / "seg", seed=3, progress=False)
    seg = open_seg_dataset(tmp_path / "seg")
    assert seg.class_names[0] == "background" and seg.num_classes == 5
    names = {s.name for s in seg.all_samples()}
    assert names == set(truth)
    for sample in seg.all_samples():
        np.testing.assert_array_equal(read_label_png(sample.label), truth[sample.name])
        assert sample.image.read_bytes() == (root / "train_images" / sample.name).read_bytes()
    # defect-free images are held apart from the split
    assert {s.name for s in seg.splits["defect_free"]} == {"d.jpg", "f.jpg"}
    # lists are relative to the root, one `image label` pair a line
    first = (tmp_path / "seg" / "train_list.txt").read_text().splitlines()[0]
    assert first.startswith("JPEGImages/") and " Annotations/" in first
    assert open_kaggle_folder(root).image_ids  # source untouched


def test_list_errors_name_file_and_line(tmp_path):
    (tmp_path / "train_list.txt").write_text("JPEGImages/a.jpg Annotations/a.png\nJPEGImages/b.jpg\n")
    with pytest.raises(DataError, match="train_list.txt:2: expected `image_path label_path`"):
        read_list(tmp_path, "train_list.txt")
