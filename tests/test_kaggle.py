import numpy as np
import pytest

from steel_seg.data.errors import BadSampleError, DataError
from steel_seg.data.kaggle import label_map, open_kaggle_folder, read_train_csv
from tests.conftest import TINY_LAYOUT, write_kaggle_folder


@pytest.mark.parametrize("old_format", [False, True])
def test_both_layouts_give_the_same_labels(tmp_path, old_format):
    truth = write_kaggle_folder(tmp_path, TINY_LAYOUT, old_format=old_format)
    folder = open_kaggle_folder(tmp_path)
    assert folder.image_ids == tuple(sorted(TINY_LAYOUT))
    for image_id, label in truth.items():
        np.testing.assert_array_equal(folder.label(image_id, label.shape), label)
        assert folder.classes_of(image_id) == frozenset(TINY_LAYOUT[image_id])


def test_images_without_rows_are_defect_free(tiny_kaggle):
    root, _ = tiny_kaggle
    folder = open_kaggle_folder(root)
    assert "d.jpg" not in folder.runs  # the new layout has no rows for it
    assert folder.classes_of("d.jpg") == frozenset()
    assert not folder.label("d.jpg", (32, 64)).any()


def test_old_layout_lists_empty_rows_as_known_defect_free(tmp_path):
    write_kaggle_folder(tmp_path, TINY_LAYOUT, old_format=True)
    runs = read_train_csv(tmp_path / "train.csv")
    assert runs["d.jpg"] == {}
    assert sorted(runs["c.jpg"]) == [3, 4]


def _csv(tmp_path, text):
    path = tmp_path / "train.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("Image,Class,Pixels\n", "unknown header"),
        ("ImageId,ClassId,EncodedPixels\na.jpg,5,1 2\n", ":2: ClassId 5 is outside 1..4"),
        ("ImageId,ClassId,EncodedPixels\na.jpg,x,1 2\n", ":2: ClassId 'x' is not an integer"),
        ("ImageId,ClassId,EncodedPixels\na.jpg,1,1 2\na.jpg,1,5 2\n", ":3 (ImageId a.jpg, ClassId 1): second mask"),
        ("ImageId_ClassId,EncodedPixels\na.jpg3,1 2\n", ":2: ImageId_ClassId"),
        ("ImageId,ClassId,EncodedPixels\na.jpg,1\n", ":2: expected 3 columns"),
    ],
)
def test_csv_errors_name_the_line(tmp_path, text, fragment):
    with pytest.raises(DataError) as info:
        read_train_csv(_csv(tmp_path, text))
    assert str(tmp_path / "train.csv") in str(info.value)
    assert fragment in str(info.value)


def test_malformed_rle_names_csv_row(tiny_kaggle):
    root, _ = tiny_kaggle
    lines = (root / "train.csv").read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",5 3 2"  # odd token count on line 3
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    folder = open_kaggle_folder(root)
    image_id = lines[2].split(",")[0]
    with pytest.raises(BadSampleError) as info:
        folder.label(image_id, (32, 64))
    assert "train.csv:3" in str(info.value) and "odd number of tokens" in str(info.value)
    assert str(info.value).count("train.csv") == 1  # the file is named once


def test_overlapping_classes_are_an_error():
    from steel_seg.data.kaggle import Run

    runs = {1: Run("1 4", "train.csv:2"), 3: Run("3 4", "train.csv:3")}
    with pytest.raises(ValueError, match="train.csv:3: mask overlaps class 1"):
        label_map(runs, (4, 4))


def test_rows_for_missing_images_are_an_error(tiny_kaggle):
    root, _ = tiny_kaggle
    (root / "train_images" / "a.jpg").unlink()
    with pytest.raises(DataError, match="1 image\\(s\\) listed but not in .*a.jpg"):
        open_kaggle_folder(root)
