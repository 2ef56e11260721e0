"""Preparing data from a config: split lists, defect-free images, cache and bad samples."""

import numpy as np
import pytest
from PIL import Image

from steel_seg.config.schema import DataConfig
from steel_seg.data import cache as cache_module
from steel_seg.data.cache import build_cache
from steel_seg.data.errors import BadSampleError, DataError
from steel_seg.data.images import read_image
from steel_seg.data.paddlex_layout import open_seg_dataset, read_label_png
from steel_seg.data.prepare import prepare_data
from tests.conftest import write_kaggle_folder

LAYOUT = {f"img{i:03d}.jpg": ({3: (0, 10, 0, 30)} if i % 3 else {1: (5, 9, 5, 9)}) if i % 2 else {} for i in range(40)}


@pytest.fixture
def kaggle_root(tmp_path):
    write_kaggle_folder(tmp_path / "kaggle", LAYOUT)
    return tmp_path / "kaggle"


def _config(tmp_path, root, **kw):
    return DataConfig(root=root, work_dir=tmp_path / "work", size=(32, 16), **kw)


def test_defect_free_images_go_to_train_only(tmp_path, kaggle_root):
    base = prepare_data(_config(tmp_path, kaggle_root), progress=False)
    seg_root = base.seg.root
    lists = {p.name: p.read_bytes() for p in seg_root.glob("*_list.txt")}
    with_free = prepare_data(_config(tmp_path, kaggle_root, include_defect_free=True), progress=False)

    assert with_free.seg.root == seg_root  # same conversion and split, reused
    assert {p.name: p.read_bytes() for p in seg_root.glob("*_list.txt")} == lists  # byte-for-byte
    assert with_free.val == base.val and with_free.test == base.test
    assert len(base.defect_free) == 20
    assert with_free.train == base.train + base.defect_free
    assert not any(read_label_png(s.label).any() for s in base.defect_free)
    assert all(read_label_png(s.label).any() for s in base.train + base.val + base.test)


def test_cache_holds_resized_pairs(tmp_path, kaggle_root):
    data = prepare_data(_config(tmp_path, kaggle_root), progress=False)
    assert data.cache.images.shape[1:] == (16, 32, 3) and data.cache.labels.shape[1:] == (16, 32)
    sample = data.val[0]
    image, label = data.cache.pair(data.cache.index_of(sample))
    full = read_label_png(sample.label)
    # nearest-neighbour labels: only ids present in the source appear
    assert set(np.unique(label)) <= set(np.unique(full))
    assert image.dtype == np.uint8 and abs(float(image.mean()) - float(read_image(sample.image).mean())) < 5


def test_cache_is_reused_and_invalidated(tmp_path, kaggle_root, monkeypatch):
    seg = prepare_data(_config(tmp_path, kaggle_root), progress=False).seg
    samples = seg.all_samples()
    calls = []
    real = cache_module.read_sample
    monkeypatch.setattr(cache_module, "read_sample", lambda s: calls.append(s) or real(s))

    first = build_cache(samples, (32, 16), tmp_path / "work" / "cache", progress=False, num_classes=5)
    assert calls == []  # built by prepare_data already: reused
    other_size = build_cache(samples, (24, 16), tmp_path / "work" / "cache", progress=False, num_classes=5)
    assert len(calls) == len(samples) and other_size.directory != first.directory

    calls.clear()
    target = samples[0].image
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(target, format="JPEG")  # source changed
    rebuilt = build_cache(samples, (32, 16), tmp_path / "work" / "cache", progress=False, num_classes=5)
    assert rebuilt.directory != first.directory and len(calls) == len(samples)
    assert rebuilt.pair(rebuilt.index_of(samples[0]))[0].max() < 10


def test_bad_image_stops_with_its_name(tmp_path, kaggle_root):
    (kaggle_root / "train_images" / "img007.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BadSampleError, match="img007.jpg: unreadable image"):
        prepare_data(_config(tmp_path, kaggle_root), progress=False)
    assert not list((tmp_path / "work" / "converted").glob("kaggle-*"))  # nothing half-written


def test_bad_samples_can_be_skipped_and_are_reported(tmp_path, kaggle_root, caplog):
    (kaggle_root / "train_images" / "img007.jpg").write_bytes(b"not a jpeg")
    data = prepare_data(_config(tmp_path, kaggle_root, on_bad_sample="skip"), progress=False)
    assert [p for p, _ in data.skipped] == [str(kaggle_root / "train_images" / "img007.jpg")]
    assert "img007.jpg" not in {s.name for s in data.train + data.val + data.test}
    assert "skipped bad sample" in caplog.text
    # a second run reuses the conversion and still reports the skip
    again = prepare_data(_config(tmp_path, kaggle_root, on_bad_sample="skip"), progress=False)
    assert [p for p, _ in again.skipped] == [p for p, _ in data.skipped]


def test_truncated_jpeg_is_caught_by_the_cache(tmp_path, kaggle_root):
    path = kaggle_root / "train_images" / "img004.jpg"
    path.write_bytes(path.read_bytes()[:200])  # header survives, pixels do not
    data = prepare_data(_config(tmp_path, kaggle_root, on_bad_sample="skip"), progress=False)
    assert any("img004.jpg" in p for p, _ in data.skipped)


def test_jpeg_cut_at_half_its_bytes_is_caught_though_opencv_decodes_it(tmp_path, kaggle_root):
    import cv2
    import numpy as np

    path = kaggle_root / "train_images" / "img005.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy: decodes into grey, silently
    assert cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(BadSampleError, match="img005.jpg: truncated JPEG"):
        prepare_data(_config(tmp_path / "strict", kaggle_root), progress=False)
    data = prepare_data(_config(tmp_path / "skip", kaggle_root, on_bad_sample="skip"), progress=False)
    assert [reason for p, reason in data.skipped if "img005.jpg" in p] == [
        "truncated JPEG (no end-of-image marker): the file was cut short, e.g. by an interrupted copy"
    ]


def test_missing_root_without_fallback_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(_config(tmp_path, tmp_path / "nowhere", fallback_to_demo=False), progress=False)


def test_seg_layout_is_used_as_is(tmp_path, kaggle_root):
    converted = prepare_data(_config(tmp_path, kaggle_root), progress=False).seg.root
    data = prepare_data(_config(tmp_path, converted), progress=False)
    assert data.seg.root == converted and open_seg_dataset(converted).splits["val"] == data.val


def test_label_ids_outside_the_classes_name_the_file(tmp_path, kaggle_root):
    from steel_seg.data.paddlex_layout import write_label_png

    seg = prepare_data(_config(tmp_path, kaggle_root), progress=False).seg
    sample = seg.splits["val"][0]
    label = read_label_png(sample.label).copy()
    label[0, 0] = 7  # labels.txt lists 5 classes
    write_label_png(sample.label, label)
    with pytest.raises(BadSampleError, match=rf"{sample.label.name}: class id\(s\) \[7\] outside 0..4"):
        prepare_data(_config(tmp_path, seg.root), progress=False)
