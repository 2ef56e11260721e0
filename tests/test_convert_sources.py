"""`convert` from mask folders and Labelme JSON: written SEG layouts read back as the masks drawn."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from steel_seg.data.__main__ import main
from steel_seg.data.errors import BadSampleError, DataError
from steel_seg.data.labelme import convert_labelme
from steel_seg.data.mask_folders import convert_mask_folders
from steel_seg.data.paddlex_layout import open_seg_dataset, read_label_png

SHAPE = (32, 64)  # H, W
SPLITS = ("train", "val", "test")


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(60, 200, size=(*SHAPE, 3), dtype=np.uint8)


def _read_back(out: Path) -> tuple[list[str], dict[str, str], dict[str, np.ndarray]]:
    """Class names, each image's split and each image's label (by stem) from a written SEG layout."""
    seg = open_seg_dataset(out)
    split_of, labels = {}, {}
    for split, samples in seg.splits.items():
        for sample in samples:
            split_of[sample.image.stem] = split
            labels[sample.image.stem] = read_label_png(sample.label)
            assert sample.image.is_file()
    return seg.class_names, split_of, labels


def _assert_split(split_of: dict[str, str], labels: dict[str, np.ndarray]) -> None:
    """Images with defects are in train/val/test (each non-empty), defect-free ones apart."""
    for stem, label in labels.items():
        assert (split_of[stem] in SPLITS) == bool(label.any()), stem
    assert {split_of[s] for s in split_of if split_of[s] != "defect_free"} == set(SPLITS)


# --- mask folders ---------------------------------------------------------------------------


def _class_id_label(i: int) -> np.ndarray:
    """12 of 16 images with defects of both classes (one stratum, so 7:2:1 fills every split)."""
    label = np.zeros(SHAPE, np.uint8)
    if i % 4 == 3:
        return label
    label[2 + i : 12 + i, 3 : 20 + i] = 1
    label[15:30, 10 + i : 50 + i // 2] = 2  # overlaps class 1 in some images
    return label


def _write_images(root: Path, count: int, suffix: str = ".jpg") -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(root / "images" / f"img{i:02d}{suffix}"), _image(i))


def test_one_mask_per_image_round_trip(tmp_path):
    src = tmp_path / "src"
    _write_images(src, 16)
    (src / "masks").mkdir()
    drawn = {}
    for i in range(16):
        drawn[f"img{i:02d}"] = _class_id_label(i)
        suffix = ".bmp" if i == 5 else ".png"  # any lossless extension with the same stem
        cv2.imwrite(str(src / "masks" / f"img{i:02d}{suffix}"), drawn[f"img{i:02d}"])

    convert_mask_folders(src, tmp_path / "out", ["scratch", "pit"], progress=False)
    names, split_of, labels = _read_back(tmp_path / "out")

    assert names == ["background", "scratch", "pit"]
    assert labels.keys() == drawn.keys()
    for stem, label in drawn.items():
        np.testing.assert_array_equal(labels[stem], label, err_msg=stem)
    _assert_split(split_of, labels)
    same = open_seg_dataset(tmp_path / "out").splits["train"][0]
    assert same.image.read_bytes() == (src / "images" / same.image.name).read_bytes()


def test_anti_aliased_0_255_masks_binarised_at_128(tmp_path):
    src = tmp_path / "src"
    _write_images(src, 12, ".png")
    (src / "masks").mkdir()
    expected = {}
    for i in range(12):
        mask = np.zeros(SHAPE, np.uint8)
        if i < 9:
            cv2.circle(mask, (10 + 4 * i, 16), 6 + i % 3, 255, thickness=-1, lineType=cv2.LINE_AA)
            mask = cv2.GaussianBlur(mask, (5, 5), 0)
        assert i >= 9 or len(np.unique(mask)) > 10  # soft edges, not 0/255 only
        cv2.imwrite(str(src / "masks" / f"img{i:02d}.png"), mask)
        expected[f"img{i:02d}"] = (mask >= 128).astype(np.uint8)

    convert_mask_folders(src, tmp_path / "out", progress=False)
    names, split_of, labels = _read_back(tmp_path / "out")

    assert names == ["background", "defect_1"]
    for stem, label in expected.items():
        np.testing.assert_array_equal(labels[stem], label, err_msg=stem)
    _assert_split(split_of, labels)


def test_one_folder_per_class_round_trip_later_class_wins(tmp_path):
    src = tmp_path / "src"
    _write_images(src, 14)
    for name in ("pit", "scratch"):
        (src / "masks" / name).mkdir(parents=True)
    expected_sorted, expected_given = {}, {}
    for i in range(14):
        stem = f"img{i:02d}"
        pit, scratch = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
        if i % 3 != 2:
            scratch[5:25, 5 : 30 + i] = 255
            cv2.imwrite(str(src / "masks" / "scratch" / f"{stem}.png"), scratch)
        if i % 2 == 0 and i < 12:
            pit[10:20, 20:40] = 1  # 0/1 and 0/255 masks in one folder set both read as binary
            pit[10:20, 20:40] = 255 if i % 4 else 1
            cv2.imwrite(str(src / "masks" / "pit" / f"{stem}.png"), pit)
        # sorted folders: pit=1, scratch=2 (scratch drawn last); --classes scratch,pit: pit wins
        for expected, ids in ((expected_sorted, {"pit": 1, "scratch": 2}), (expected_given, {"scratch": 1, "pit": 2})):
            label = np.zeros(SHAPE, np.uint8)
            for name in sorted(ids, key=ids.get):
                label[(pit if name == "pit" else scratch) > 0] = ids[name]
            expected[stem] = label

    # 0/1 next to 0/255 in one set is refused: the 0/1 masks would vanish at 128
    with pytest.raises(DataError, match="below 128"):
        convert_mask_folders(src, tmp_path / "mixed", progress=False)
    for i in range(0, 12, 4):
        pit = cv2.imread(str(src / "masks" / "pit" / f"img{i:02d}.png"), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(src / "masks" / "pit" / f"img{i:02d}.png"), pit * 255)

    for out, classes, expected in (("sorted", None, expected_sorted), ("given", ["scratch", "pit"], expected_given)):
        convert_mask_folders(src, tmp_path / out, classes, progress=False)
        names, split_of, labels = _read_back(tmp_path / out)
        assert names == ["background", *(classes or ["pit", "scratch"])]
        assert labels.keys() == expected.keys()
        for stem, label in expected.items():
            np.testing.assert_array_equal(labels[stem], label, err_msg=f"{out} {stem}")
        _assert_split(split_of, labels)
        assert split_of["img11"] == "defect_free"  # no mask file in any class folder


def test_mask_folder_errors_name_the_files(tmp_path):
    src = tmp_path / "src"
    _write_images(src, 3)
    (src / "masks").mkdir()
    for i in range(3):
        cv2.imwrite(str(src / "masks" / f"img{i:02d}.png"), _class_id_label(i))
    cv2.imwrite(str(src / "masks" / "img01.png"), np.zeros((32, 60), np.uint8))
    with pytest.raises(BadSampleError, match=r"img01\.png: mask is 60x32 but its image .*img01\.jpg is 64x32"):
        convert_mask_folders(src, tmp_path / "out", progress=False)
    # with --skip-bad it is reported and left out
    skipped = []
    seg = convert_mask_folders(src, tmp_path / "skip", skip_bad=True, on_skip=lambda p, r: skipped.append(p), progress=False)
    assert skipped == [str(src / "masks" / "img01.png")]
    assert "img01" not in {s.image.stem for s in seg.all_samples()}

    (src / "masks" / "img01.png").unlink()
    with pytest.raises(DataError, match=r"image\(s\) without a mask .*img01\.jpg"):
        convert_mask_folders(src, tmp_path / "out", progress=False)
    cv2.imwrite(str(src / "masks" / "img01.png"), _class_id_label(1))
    cv2.imwrite(str(src / "masks" / "stray.png"), _class_id_label(1))
    with pytest.raises(DataError, match=r"without an image .*stray\.png"):
        convert_mask_folders(src, tmp_path / "out", progress=False)
    (src / "masks" / "stray.png").unlink()
    with pytest.raises(DataError, match=r"mask value 2 is not a class id: --classes names 1"):
        convert_mask_folders(src, tmp_path / "out", ["scratch"], progress=False)


# --- Labelme --------------------------------------------------------------------------------


def _shape(label, points, kind="polygon"):
    return {"label": label, "points": [[float(x), float(y)] for x, y in points], "shape_type": kind,
            "group_id": None, "flags": {}}


def _write_labelme(path: Path, image_name: str, shapes, image: np.ndarray | None = None, size=SHAPE, embed=False):
    content = {"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": image_name,
               "imageHeight": size[0], "imageWidth": size[1], "imageData": None}
    if image is not None:
        ok, encoded = cv2.imencode(Path(image_name).suffix, image)
        if embed:
            content["imageData"] = base64.b64encode(encoded.tobytes()).decode()
        else:
            (path.parent / image_name).parent.mkdir(parents=True, exist_ok=True)
            (path.parent / image_name).write_bytes(encoded.tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _labelme_set(root: Path) -> dict[str, np.ndarray]:
    """12 annotated images (polygons, rectangles, a circle, a hole), 2 empty; expected labels by stem."""
    classes = {"scratch": 1, "pit": 2}
    expected = {}
    for i in range(14):
        stem = f"img{i:02d}"
        label = np.zeros(SHAPE, np.uint8)
        shapes = []
        if i < 12:
            poly = [(3 + i, 2), (30 + i, 4), (25, 28), (5, 20)]
            shapes.append(_shape("scratch", poly))
            cv2.fillPoly(label, [np.array(poly, np.int32)], 1)
            if i % 2:
                shapes.append(_shape("pit", [(40, 5), (60, 20)], "rectangle"))
                cv2.rectangle(label, (40, 5), (60, 20), 2, thickness=-1)
            if i % 3 == 0:  # overlaps the scratch: drawn later, so it wins
                shapes.append(_shape("pit", [(10, 10), (15, 10)], "circle"))
                cv2.circle(label, (10, 10), 5, 2, thickness=-1)
        # subfolder + embedded image data exercise imagePath and imageData
        json_path = root / ("sub" if i == 4 else "") / f"{stem}.json"
        _write_labelme(json_path, f"{stem}.jpg" if i != 4 else f"../pics/{stem}.jpg", shapes, _image(i), embed=i == 7)
        expected[stem] = label
    assert set(classes.values()) == {1, 2}
    return expected


def test_labelme_round_trip(tmp_path):
    src = tmp_path / "labelme"
    expected = _labelme_set(src)
    assert not (src / "img07.jpg").exists()

    convert_labelme(src, tmp_path / "out", ["scratch", "pit"], progress=False)
    names, split_of, labels = _read_back(tmp_path / "out")

    assert names == ["background", "scratch", "pit"]
    assert labels.keys() == expected.keys()
    for stem, label in expected.items():
        np.testing.assert_array_equal(labels[stem], label, err_msg=stem)
    _assert_split(split_of, labels)
    embedded = tmp_path / "out" / "JPEGImages" / "img07.jpg"
    assert cv2.imread(str(embedded)).shape == (*SHAPE, 3)
    assert not list((tmp_path / "out").glob(".labelme-image-data-*"))  # staging removed


def test_labelme_polygon_with_a_hole(tmp_path):
    src = tmp_path / "labelme"
    outer = [(4, 4), (60, 4), (60, 28), (4, 28)]
    hole = [(20, 10), (40, 10), (40, 20), (20, 20)]
    for i in range(12):
        shapes = [_shape("scratch", outer), _shape("_background_" if i % 2 else "background", hole)]
        _write_labelme(src / f"img{i:02d}.json", f"img{i:02d}.jpg", shapes, _image(i))

    convert_labelme(src, tmp_path / "out", progress=False)
    names, _, labels = _read_back(tmp_path / "out")

    expected = np.zeros(SHAPE, np.uint8)
    cv2.fillPoly(expected, [np.array(outer, np.int32)], 1)
    cv2.fillPoly(expected, [np.array(hole, np.int32)], 0)
    assert names == ["background", "scratch"]  # labels found; background labels are not classes
    for stem, label in labels.items():
        np.testing.assert_array_equal(label, expected, err_msg=stem)
        assert not label[10:21, 20:41].any() and label[5, 5] == 1 and label[25, 50] == 1


def test_labelme_unknown_label_names_the_file(tmp_path):
    src = tmp_path / "labelme"
    _labelme_set(src)
    _write_labelme(src / "img03.json", "img03.jpg", [_shape("scratch", [(1, 1), (9, 1), (5, 9)]),
                                                     _shape("scrach", [(20, 1), (29, 1), (25, 9)])])
    with pytest.raises(DataError) as caught:
        convert_labelme(src, tmp_path / "out", ["scratch", "pit"], progress=False)
    message = str(caught.value)
    assert str(src / "img03.json") in message and "'scrach'" in message and "shapes[1]" in message
    assert "known labels: scratch, pit" in message and "Did you mean 'scratch'?" in message
    assert not (tmp_path / "out" / "labels.txt").exists()  # refused before writing anything


def test_labelme_bad_files_name_file_and_shape(tmp_path):
    src = tmp_path / "labelme"
    _labelme_set(src)
    _write_labelme(src / "img05.json", "img05.jpg", [_shape("scratch", [(1, 1), (9, 1), (5, 9)]),
                                                     _shape("scratch", [(1, 1), (9, 9)], "line")])
    with pytest.raises(BadSampleError, match=r"img05\.json: shapes\[1\] \(label 'scratch'\) is a 'line'"):
        convert_labelme(src, tmp_path / "out", progress=False)
    skipped = []
    convert_labelme(src, tmp_path / "skip", skip_bad=True, on_skip=lambda p, r: skipped.append(p), progress=False)
    assert skipped == [str(src / "img05.json")]

    _labelme_set(src)
    _write_labelme(src / "img06.json", "img06.jpg", [_shape("pit", [(1, 1), (9, 9)], "rectangle")], size=(30, 64))
    with pytest.raises(BadSampleError, match=r"img06\.json: imageHeight x imageWidth is 30x64 but the image .* is 32x64"):
        convert_labelme(src, tmp_path / "out2", progress=False)


def test_cli_converts_labelme_and_masks(tmp_path, capsys):
    src = tmp_path / "labelme"
    _labelme_set(src)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--from", "labelme", "--classes", "scratch,pit", "--quiet"]) == 0
    printed = capsys.readouterr().out
    seg = open_seg_dataset(out)
    sizes = {name: len(seg.splits[name]) for name in (*SPLITS, "defect_free")}
    assert sizes["defect_free"] == 2 and sum(sizes.values()) == 14 and min(sizes.values()) > 0
    assert f"wrote SEG layout to {out}: " + "  ".join(f"{k}={v}" for k, v in sizes.items()) in printed

    # detected as labelme; without --classes the sorted labels are used and printed
    assert main(["convert", str(src), str(tmp_path / "auto"), "--quiet"]) == 0
    assert "classes (ids 0..2): background, pit, scratch" in capsys.readouterr().out

    assert main(["convert", str(src), str(out), "--classes", "scratch", "--quiet"]) == 2  # not empty
    assert main(["convert", str(src), str(tmp_path / "o3"), "--classes", "scratch", "--quiet"]) == 2
    assert "unknown label 'pit'" in capsys.readouterr().err

    masks = tmp_path / "masks"
    _write_images(masks, 12)
    (masks / "masks").mkdir()
    for i in range(12):
        cv2.imwrite(str(masks / "masks" / f"img{i:02d}.png"), _class_id_label(i))
    assert main(["convert", str(masks), str(tmp_path / "m"), "--classes", "scratch,pit", "--seed", "3", "--quiet"]) == 0
    assert "wrote SEG layout" in capsys.readouterr().out
    assert open_seg_dataset(tmp_path / "m").class_names == ["background", "scratch", "pit"]
