"""Transforms keep image and label aligned, pad with the right values, and fail helpfully."""

from __future__ import annotations

import numpy as np
import pytest

from steel_seg.transforms import (
    AUGMENT_SETS,
    TRANSFORMS,
    Compose,
    Normalize,
    RandomCrop,
    RandomDistort,
    RandomHorizontalFlip,
    RandomPaddingCrop,
    RandomVerticalFlip,
    Resize,
    ResizeStepScaling,
    adjust_hue,
    augment_set,
    build_transforms,
    eval_pipeline,
    train_pipeline,
)

SEEDS = range(40)
BLOCK = 16
GAIN = 40  # image value = class id * GAIN, so every class has its own grey level
IGNORED_GREY = 250  # image value under ignored (255) labels; never compared


def block_sample(height: int = 96, width: int = 160, seed: int = 0):
    """A label of BLOCK-sized blocks of random classes (some ignored) and the image encoding it.

    Inputs are read-only, as the data cache hands them out, so any in-place write fails.
    """
    rng = np.random.default_rng(seed)
    blocks = rng.choice([0, 1, 2, 3, 4, 255], size=(-(-height // BLOCK), -(-width // BLOCK)))
    label = np.kron(blocks, np.ones((BLOCK, BLOCK), dtype=np.int64))[:height, :width]
    label = label.astype(np.uint8)
    grey = np.where(label == 255, IGNORED_GREY, label.astype(np.int64) * GAIN).astype(np.uint8)
    image = np.repeat(grey[..., None], 3, axis=2)
    image.flags.writeable = False
    label.flags.writeable = False
    return image, label


def interior(label: np.ndarray, radius: int) -> np.ndarray:
    """Pixels with one label within `radius`: there a resized image must equal the label's grey.

    Radius 1 suits LINEAR and AREA; CUBIC and LANCZOS4 reach further (4 source pixels).
    """
    size = 2 * radius + 1
    padded = np.pad(label, radius, mode="edge")
    same = np.ones(label.shape, dtype=bool)
    h, w = label.shape
    for dy in range(size):
        for dx in range(size):
            same &= padded[dy : dy + h, dx : dx + w] == label
    return same


def assert_aligned(image: np.ndarray, label: np.ndarray, radius: int = 0) -> None:
    """Wherever the label is a class (not 255), every channel of the image encodes that class.

    radius 0 compares every pixel (flips, crops); more skips pixels near block edges.
    """
    where = label != 255
    if radius:
        where &= interior(label, radius)
    assert where.sum() > 0, "nothing left to compare"
    expected = label[where].astype(np.float64) * GAIN
    for channel in range(3):
        np.testing.assert_allclose(image[..., channel][where], expected, atol=1)


GEOMETRIC = [
    pytest.param(RandomHorizontalFlip(), 0, id="hflip"),
    pytest.param(RandomVerticalFlip(prob=0.5), 0, id="vflip"),
    pytest.param(RandomPaddingCrop(crop_size=(64, 48)), 0, id="crop-inside"),
    pytest.param(RandomPaddingCrop(crop_size=(200, 120)), 0, id="crop-padded"),
    pytest.param(RandomCrop(crop_size=(200, 40)), 0, id="crop-padded-one-side"),
    pytest.param(Resize(target_size=(400, 64)), 1, id="resize-up-down"),
    pytest.param(Resize(target_size=(40, 24)), 1, id="resize-down-4x"),
    pytest.param(Resize(target_size=(80, 48), interp="AREA"), 1, id="resize-area"),
    pytest.param(Resize(target_size=(120, 72), interp="RANDOM"), 4, id="resize-random"),
    pytest.param(ResizeStepScaling(0.5, 2.0, 0.25), 1, id="step-scaling"),
    pytest.param(ResizeStepScaling(0.75, 1.25, 0.0), 1, id="step-scaling-uniform"),
]


@pytest.mark.parametrize("transform, radius", GEOMETRIC)
def test_geometric_transforms_keep_image_and_label_aligned(transform, radius):
    image, label = block_sample()
    for seed in SEEDS:
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        assert out_image.shape[:2] == out_label.shape
        assert out_image.dtype == np.uint8 and out_label.dtype == np.uint8
        assert_aligned(out_image, out_label, radius)


def test_label_nearest_samples_pixel_centres_like_the_image():
    # Columns 0..15 shrunk 4x: the bilinear image samples columns 1.5, 5.5, ... and the label
    # must take a column next to that (1 or 2, ...), not the corner one (0, 4, ...) that
    # plain cv2 nearest picks, which would sit 15 grey levels off.
    columns = np.tile(np.arange(16, dtype=np.uint8), (4, 1))
    image = np.repeat(columns[..., None] * 10, 3, axis=2)
    out_image, out_label = Resize(target_size=(4, 4))(image, columns, None)
    np.testing.assert_array_equal(out_image[0, :, 0], [15, 55, 95, 135])
    assert np.abs(out_image[0, :, 0].astype(int) - out_label[0].astype(int) * 10).max() <= 5


@pytest.mark.parametrize("flip, axis", [(RandomHorizontalFlip(), 1), (RandomVerticalFlip(0.5), 0)])
def test_flips_take_both_branches_and_mirror_exactly(flip, axis):
    image, label = block_sample()
    flipped = 0
    for seed in SEEDS:
        out_image, out_label = flip(image, label, np.random.default_rng(seed))
        if np.array_equal(out_label, label):
            np.testing.assert_array_equal(out_image, image)
        else:
            np.testing.assert_array_equal(out_label, np.flip(label, axis))
            np.testing.assert_array_equal(out_image, np.flip(image, axis))
            flipped += 1
    assert 0 < flipped < len(SEEDS)


def test_flip_probabilities_follow_paddlex_defaults():
    assert RandomHorizontalFlip().prob == 0.5
    assert RandomVerticalFlip().prob == 0.1
    image, label = block_sample()
    never, always = RandomHorizontalFlip(prob=0.0), RandomHorizontalFlip(prob=1.0)
    for seed in range(5):
        np.testing.assert_array_equal(never(image, label, np.random.default_rng(seed))[1], label)
        flipped = always(image, label, np.random.default_rng(seed))[1]
        np.testing.assert_array_equal(flipped, label[:, ::-1])


def test_padding_uses_ignore_label_and_image_padding_value():
    image, label = block_sample(height=40, width=50)
    crop = RandomPaddingCrop(crop_size=(70, 60))  # (width, height), both larger than the image
    out_image, out_label = crop(image, label, np.random.default_rng(0))
    assert out_image.shape == (60, 70, 3) and out_label.shape == (60, 70)
    # Padding is bottom/right only, so the whole original sits at the top-left corner.
    np.testing.assert_array_equal(out_image[:40, :50], image)
    np.testing.assert_array_equal(out_label[:40, :50], label)
    assert (out_label[40:] == 255).all() and (out_label[:, 50:] == 255).all()
    assert (out_image[40:] == 128).all() and (out_image[:, 50:] == 128).all()  # 127.5 rounded

    float_image = image.astype(np.float32)
    padded, _ = RandomPaddingCrop((70, 60), im_padding_value=(1.5, 2.5, 3.5))(
        float_image, label, np.random.default_rng(0)
    )
    np.testing.assert_array_equal(padded[50, 60], np.array([1.5, 2.5, 3.5], dtype=np.float32))
    pad_with_0 = RandomPaddingCrop((70, 60), label_padding_value=0)
    assert (pad_with_0(image, label, np.random.default_rng(0))[1][40:] == 0).all()


def test_crop_stays_inside_and_reaches_every_offset():
    height, width = 20, 30
    # Each pixel's value is its flat index, so the crop's top-left value tells its offset.
    positions = np.arange(height * width).reshape(height, width)
    image = np.repeat(positions[..., None], 3, axis=2).astype(np.float32)
    label = np.zeros((height, width), dtype=np.uint8)
    crop = RandomPaddingCrop(crop_size=(27, 18))
    offsets = set()
    for seed in range(300):
        out_image, out_label = crop(image, label, np.random.default_rng(seed))
        assert out_image.shape == (18, 27, 3) and (out_label == 0).all()  # no padding needed
        top, left = divmod(int(out_image[0, 0, 0]), width)
        np.testing.assert_array_equal(out_image, image[top : top + 18, left : left + 27])
        offsets.add((top, left))
    assert offsets == {(t, l) for t in range(3) for l in range(4)}


def test_crop_size_is_width_height_and_int_means_square():
    image, label = block_sample()
    out_image, _ = RandomCrop(crop_size=(40, 24))(image, label, np.random.default_rng(0))
    assert out_image.shape == (24, 40, 3)
    assert RandomPaddingCrop(crop_size=32).crop_size == (32, 32)
    assert Resize(target_size=32).target_size == (32, 32)


def test_resize_is_width_height_and_labels_stay_nearest():
    image, label = block_sample()
    for target in [(400, 64), (37, 23), (160, 96)]:
        out_image, out_label = Resize(target_size=target, interp="CUBIC")(image, label, None)
        assert out_image.shape == (target[1], target[0], 3)
        assert set(np.unique(out_label)) <= set(np.unique(label))


def test_labels_are_optional_at_inference():
    image, _ = block_sample()
    for name, cls in TRANSFORMS.items():
        out_image, out_label = cls()(image, None, np.random.default_rng(0))
        assert out_label is None, name
        assert out_image.ndim == 3, name


def test_same_seed_same_sample():
    image, label = block_sample()
    pipeline = train_pipeline("flip_distort_crop", size=(120, 64))
    for seed in range(10):
        first = pipeline(image, label, np.random.default_rng(seed))
        second = pipeline(image, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1], second[1])
    outputs = {pipeline(image, label, np.random.default_rng(s))[0].tobytes() for s in range(10)}
    assert len(outputs) > 1


def colour_image(seed: int = 0) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    image.flags.writeable = False
    return image


def test_random_distort_changes_only_the_image_and_stays_uint8():
    image = colour_image()
    _, label = block_sample(height=32, width=48)
    distort = RandomDistort()
    changed = 0
    for seed in SEEDS:
        out_image, out_label = distort(image, label, np.random.default_rng(seed))
        assert out_label is label
        assert out_image.dtype == np.uint8 and out_image.shape == image.shape
        changed += not np.array_equal(out_image, image)
    assert changed > len(SEEDS) // 2  # each of 4 ops fires with p=0.5: nothing ~6% of the time


def test_random_distort_saturates_instead_of_wrapping():
    # A grey ramp must stay ordered: uint8 wrap-around (255 + 1 -> 0) would break the order.
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    strong = RandomDistort(0.9, 1, 0.9, 1, 0.9, 1, 180, 0)
    seen_max = False
    for seed in SEEDS:
        out_image, _ = strong(ramp, None, np.random.default_rng(seed))
        assert out_image.dtype == np.uint8
        assert (np.diff(out_image[0, :, 0].astype(int)) >= 0).all()
        seen_max |= bool((out_image[0, -20:] == 255).all())
    assert seen_max


def test_hue_shift_is_in_degrees():
    red = np.zeros((2, 2, 3), dtype=np.float32)
    red[..., 0] = 255
    np.testing.assert_allclose(adjust_hue(red, 120)[0, 0], [0, 255, 0], atol=1e-3)
    np.testing.assert_allclose(adjust_hue(red, -120)[0, 0], [0, 0, 255], atol=1e-3)
    image = colour_image().astype(np.float32)
    np.testing.assert_allclose(adjust_hue(image, 360), image, atol=1e-2)


def test_random_distort_single_ops():
    image = colour_image()
    rng = np.random.default_rng(0)
    off = dict(brightness_prob=0, contrast_prob=0, saturation_prob=0, hue_prob=0)
    np.testing.assert_array_equal(RandomDistort(**off)(image, None, rng)[0], image)
    # Zero range: every op fires but with factor 1 / shift 0, so the image comes back.
    identity = RandomDistort(0, 1, 0, 1, 0, 1, 0, 1)
    np.testing.assert_allclose(identity(image, None, rng)[0], image, atol=1)
    # Saturation never changes a grey image; brightness scales it.
    grey = np.full((4, 4, 3), 100, dtype=np.uint8)
    saturate = RandomDistort(**{**off, "saturation_prob": 1})
    np.testing.assert_array_equal(saturate(grey, None, rng)[0], grey)
    brighten = RandomDistort(**{**off, "brightness_prob": 1})
    values = {int(brighten(grey, None, np.random.default_rng(s))[0][0, 0, 0]) for s in SEEDS}
    assert min(values) >= 50 and max(values) <= 150 and len(values) > 5


def test_random_distort_rejects_normalized_images():
    normalized, _ = Normalize()(colour_image(), None, None)
    with pytest.raises(ValueError, match="before Normalize"):
        RandomDistort()(normalized, None, np.random.default_rng(0))


def test_normalize_maps_0_to_minus_1_and_255_to_1():
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[1] = 255
    label = np.ones((2, 3), dtype=np.uint8)
    out_image, out_label = Normalize()(image, label, None)
    assert out_image.dtype == np.float32 and out_image.shape == (2, 3, 3)
    np.testing.assert_allclose(out_image[0], -1.0)
    np.testing.assert_allclose(out_image[1], 1.0)
    assert out_label is label
    imagenet = Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    expected = [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]
    np.testing.assert_allclose(imagenet(image, None, None)[0][0, 0], expected, rtol=1e-5)


def test_compose_applies_in_order_and_checks_inputs():
    image, label = block_sample()
    pipeline = Compose([Resize((40, 24)), RandomPaddingCrop((50, 30)), Normalize()])
    out_image, out_label = pipeline(image, label, np.random.default_rng(0))
    assert out_image.shape == (30, 50, 3) and out_image.dtype == np.float32
    assert out_label.shape == (30, 50) and (out_label[24:] == 255).all()
    with pytest.raises(ValueError, match="does not match"):
        pipeline(image, label[:10], np.random.default_rng(0))
    with pytest.raises(TypeError, match="RandomPaddingCrop is random"):
        pipeline(image, label)


def test_build_transforms_from_specs():
    pipeline = build_transforms(
        [
            {"type": "RandomHorizontalFlip", "prob": 0.5},
            {"type": "RandomCrop", "crop_size": [64, 32]},
            {"type": "Normalize"},
        ]
    )
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names == ["RandomHorizontalFlip", "RandomCrop", "Normalize"]
    assert pipeline.transforms[1].crop_size == (64, 32)


def test_build_transforms_unknown_type_suggests_nearest():
    with pytest.raises(ValueError) as err:
        build_transforms([{"type": "RandomHorizontalFlip"}, {"type": "RandomHorizontalFilp"}])
    message = str(err.value)
    assert "transforms[1]" in message and "'RandomHorizontalFilp'" in message
    assert "Did you mean 'RandomHorizontalFlip'?" in message
    assert all(name in message for name in TRANSFORMS)


def test_build_transforms_bad_argument_names_transform_and_valid_arguments():
    with pytest.raises(ValueError) as err:
        build_transforms([{"type": "RandomDistort", "brightnes_range": 0.3}], where="augment")
    message = str(err.value)
    assert "augment[0] (RandomDistort)" in message and "'brightnes_range'" in message
    assert "Did you mean 'brightness_range'?" in message and "hue_prob" in message


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"prob": 0.5}, "'type' key"),
        ({"type": "RandomHorizontalFlip", "prob": 1.5}, r"transforms\[0\]: .*prob must be"),
        ({"type": "Resize", "target_size": [0, 10]}, "target_size must be"),
        ({"type": "Resize", "interp": "BILINEAR"}, "interp must be one of"),
        ({"type": "RandomPaddingCrop", "crop_size": "train_size"}, "crop_size must be"),
        ({"type": "Normalize", "std": [0.5, 0, 0.5]}, "std must not contain 0"),
        ({"type": "ResizeStepScaling", "min_scale_factor": 2.0}, "is larger than"),
    ],
)
def test_build_transforms_bad_values(spec, match):
    with pytest.raises(ValueError, match=match):
        build_transforms([spec])


def test_augment_sets():
    assert set(AUGMENT_SETS) == {"none", "flip", "flip_distort_crop"}
    assert augment_set("none", (400, 64)) == []
    assert [s["type"] for s in augment_set("flip", (400, 64))] == ["RandomHorizontalFlip"]
    specs = augment_set("flip_distort_crop", (400, 64))
    assert [s["type"] for s in specs] == [
        "RandomHorizontalFlip",
        "RandomDistort",
        "ResizeStepScaling",
        "RandomPaddingCrop",
    ]
    assert specs[-1]["crop_size"] == [400, 64]
    specs.clear()  # callers get a copy
    assert len(augment_set("flip_distort_crop", (400, 64))) == 4
    with pytest.raises(ValueError, match="none, flip, flip_distort_crop"):
        augment_set("flip_crop", (400, 64))


@pytest.mark.parametrize("name", sorted(AUGMENT_SETS))
def test_train_pipeline_outputs_the_training_size(name):
    image, label = block_sample(height=96, width=320)
    pipeline = train_pipeline(name, size=(160, 48))
    assert type(pipeline.transforms[0]).__name__ == "Resize"
    assert type(pipeline.transforms[-1]).__name__ == "Normalize"
    for seed in range(10):
        out_image, out_label = pipeline(image, label, np.random.default_rng(seed))
        assert out_image.shape == (48, 160, 3) and out_image.dtype == np.float32
        assert out_label.shape == (48, 160)
        assert set(np.unique(out_label)) <= set(np.unique(label))
    # Geometric augmentations keep alignment through the whole pipeline (undo Normalize).
    if name != "flip_distort_crop":  # distortion changes the grey levels
        for seed in range(10):
            out_image, out_label = pipeline(image, label, np.random.default_rng(seed))
            assert_aligned((out_image * 0.5 + 0.5) * 255, out_label, radius=1)


def test_train_pipeline_accepts_lists_but_not_resize_or_normalize():
    pipeline = train_pipeline([{"type": "RandomCrop", "crop_size": "train_size"}], (64, 32))
    assert pipeline.transforms[1].crop_size == (64, 32)
    with pytest.raises(ValueError, match="remove Normalize"):
        train_pipeline([{"type": "Normalize"}], (64, 32))


def test_eval_pipeline_is_deterministic_resize_and_normalize():
    image, label = block_sample()
    pipeline = eval_pipeline((80, 32))
    assert [type(t).__name__ for t in pipeline.transforms] == ["Resize", "Normalize"]
    out_image, out_label = pipeline(image, label)  # no rng needed
    assert out_image.shape == (32, 80, 3) and out_label.shape == (32, 80)
    assert_aligned((out_image * 0.5 + 0.5) * 255, out_label, radius=1)


def test_repr_shows_paddlex_arguments():
    text = repr(train_pipeline("flip_distort_crop", (400, 64)))
    assert "RandomPaddingCrop(crop_size=(400, 64)" in text
    assert "Resize(target_size=(400, 64), interp='LINEAR')" in text
