"""Training and evaluation transforms for (image, label) pairs, named and configured as in PaddleX.

Each transform is a small class called as `transform(image, label, rng) -> (image, label)`:
`image` is (H, W, 3) RGB, uint8 until `Normalize` makes it float32; `label` is (H, W) uint8
class ids with 255 = ignore, or None at inference. All randomness comes from the `rng`
(a `numpy.random.Generator`), so the same seed gives the same sample. Inputs are never
written to: the data cache hands out read-only arrays.
"""

from __future__ import annotations

import copy
import difflib
import inspect
from typing import Any, Sequence, Union

import cv2
import numpy as np

IGNORE_INDEX = 255

# cv2's plain INTER_NEAREST samples pixel corners while INTER_LINEAR samples pixel centres, so
# a label resized with it drifts up to half an output pixel from its image (at 1600 -> 400,
# 1.5 source pixels). The "exact" variant samples centres like LINEAR and PIL.
_NEAREST = getattr(cv2, "INTER_NEAREST_EXACT", cv2.INTER_NEAREST)

_INTERPOLATIONS = {
    "NEAREST": _NEAREST,
    "LINEAR": cv2.INTER_LINEAR,
    "CUBIC": cv2.INTER_CUBIC,
    "AREA": cv2.INTER_AREA,
    "LANCZOS4": cv2.INTER_LANCZOS4,
}


# --- small helpers --------------------------------------------------------------------------


def _check_prob(owner: str, name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: {name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_non_negative(owner: str, name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{owner}: {name} must be a number >= 0, got {value!r}")
    return float(value)


def _width_height(owner: str, name: str, value: Any) -> tuple[int, int]:
    """PaddleX sizes: an int for a square, or (width, height)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
        or min(value) < 1
    ):
        raise ValueError(
            f"{owner}: {name} must be a positive int or [width, height] of positive ints, "
            f"got {value!r}"
        )
    return int(value[0]), int(value[1])


def _per_channel(owner: str, name: str, value: Any) -> np.ndarray:
    """A scalar or one number per channel, as float32 broadcastable over HWC."""
    try:
        array = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: {name} must be a number or a list of numbers, got {value!r}"
        ) from None
    if array.size == 0:
        raise ValueError(f"{owner}: {name} must not be empty")
    return array


def _require_rng(rng: Any, owner: str) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{owner} is random and needs rng=np.random.default_rng(seed), got {type(rng).__name__}"
        )
    return rng


def _resize(image: np.ndarray, label: np.ndarray | None, width: int, height: int, interp: int):
    """Resize both; the label is always nearest so no in-between class ids appear."""
    image = cv2.resize(image, (width, height), interpolation=interp)
    if label is not None:
        label = cv2.resize(label, (width, height), interpolation=_NEAREST)
    return image, label


class Transform:
    """Base: a readable repr built from the constructor's arguments, for logs and MLflow."""

    random = False  # whether __call__ draws from the rng

    def __repr__(self) -> str:
        names = inspect.signature(type(self).__init__).parameters
        args = ", ".join(
            f"{n}={getattr(self, n)!r}" for n in names if n != "self" and hasattr(self, n)
        )
        return f"{type(self).__name__}({args})"

    def __call__(self, image, label, rng):  # pragma: no cover - interface
        raise NotImplementedError


# --- geometric transforms (image and label move together) -----------------------------------


class _RandomFlip(Transform):
    """Mirror image and label along `axis` with probability `prob`."""

    random = True
    axis = 1

    def __init__(self, prob: float):
        self.prob = _check_prob(type(self).__name__, "prob", prob)

    def __call__(self, image, label, rng):
        if _require_rng(rng, type(self).__name__).random() < self.prob:
            image = np.ascontiguousarray(np.flip(image, self.axis))
            label = None if label is None else np.ascontiguousarray(np.flip(label, self.axis))
        return image, label


class RandomHorizontalFlip(_RandomFlip):
    """Mirror left-right with probability `prob`."""

    axis = 1

    def __init__(self, prob: float = 0.5):
        super().__init__(prob)


class RandomVerticalFlip(_RandomFlip):
    """Mirror top-bottom with probability `prob` (PaddleX's default is a rare 0.1)."""

    axis = 0

    def __init__(self, prob: float = 0.1):
        super().__init__(prob)


class Resize(Transform):
    """Resize to `target_size` = (width, height) or an int for a square.

    `interp` is one of NEAREST, LINEAR, CUBIC, AREA, LANCZOS4, or RANDOM (one of those per
    call). It applies to the image only; the label is always resized with NEAREST, sampled at
    pixel centres like the other modes so label and image stay aligned.
    """

    def __init__(self, target_size: int | Sequence[int] = (400, 64), interp: str = "LINEAR"):
        owner = type(self).__name__
        self.target_size = _width_height(owner, "target_size", target_size)
        if interp not in _INTERPOLATIONS and interp != "RANDOM":
            raise ValueError(
                f"{owner}: interp must be one of {sorted(_INTERPOLATIONS) + ['RANDOM']}, "
                f"got {interp!r}"
            )
        self.interp = interp
        self.random = interp == "RANDOM"

    def __call__(self, image, label, rng):
        if self.interp == "RANDOM":
            names = sorted(_INTERPOLATIONS)
            pick = _require_rng(rng, "Resize(interp='RANDOM')").integers(len(names))
            interp = _INTERPOLATIONS[names[pick]]
        else:
            interp = _INTERPOLATIONS[self.interp]
        return _resize(image, label, *self.target_size, interp)


class ResizeStepScaling(Transform):
    """Rescale both sides by one random factor from min_scale_factor to max_scale_factor.

    With `scale_step_size` > 0 the factor is one of the steps min, min+step, ..., max; with 0
    it is drawn uniformly from the range. Used before `RandomPaddingCrop` so the crop
    selects a sub-window instead of the whole image.
    """

    random = True

    def __init__(
        self,
        min_scale_factor: float = 0.75,
        max_scale_factor: float = 1.25,
        scale_step_size: float = 0.25,
    ):
        owner = type(self).__name__
        factors = {"min_scale_factor": min_scale_factor, "max_scale_factor": max_scale_factor}
        for name, value in factors.items():
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{owner}: {name} must be a number > 0, got {value!r}")
        if min_scale_factor > max_scale_factor:
            raise ValueError(
                f"{owner}: min_scale_factor ({min_scale_factor}) is larger than "
                f"max_scale_factor ({max_scale_factor})"
            )
        self.min_scale_factor = float(min_scale_factor)
        self.max_scale_factor = float(max_scale_factor)
        self.scale_step_size = _check_non_negative(owner, "scale_step_size", scale_step_size)

    def scale_factors(self) -> np.ndarray:
        """The discrete factors drawn from (empty when the draw is continuous)."""
        span = self.max_scale_factor - self.min_scale_factor
        if span == 0:
            return np.array([self.min_scale_factor])
        if self.scale_step_size == 0:
            return np.array([])
        # The small epsilon keeps max itself when span is a float multiple of the step.
        steps = int(np.floor(span / self.scale_step_size + 1e-9)) + 1
        return self.min_scale_factor + self.scale_step_size * np.arange(steps)

    def __call__(self, image, label, rng):
        rng = _require_rng(rng, type(self).__name__)
        factors = self.scale_factors()
        if factors.size:
            scale = float(factors[rng.integers(factors.size)])
        else:
            scale = float(rng.uniform(self.min_scale_factor, self.max_scale_factor))
        if scale == 1.0:
            return image, label
        height, width = image.shape[:2]
        new_w, new_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
        return _resize(image, label, new_w, new_h, cv2.INTER_LINEAR)


class RandomPaddingCrop(Transform):
    """Take a random `crop_size` = (width, height) window, padding first if the image is smaller.

    Padding goes to the bottom and right: the image with `im_padding_value` (one number or
    one per channel; rounded for uint8 images) and the label with `label_padding_value`
    (255 = ignored by the loss and the metrics).
    """

    random = True

    def __init__(
        self,
        crop_size: int | Sequence[int] = (512, 512),
        im_padding_value: float | Sequence[float] = 127.5,
        label_padding_value: int = IGNORE_INDEX,
    ):
        owner = type(self).__name__
        self.crop_size = _width_height(owner, "crop_size", crop_size)
        _per_channel(owner, "im_padding_value", im_padding_value)  # validate early
        self.im_padding_value = im_padding_value
        is_int = isinstance(label_padding_value, (int, np.integer))
        if not is_int or not 0 <= label_padding_value <= 255:
            raise ValueError(
                f"{owner}: label_padding_value must be an int in [0, 255], "
                f"got {label_padding_value!r}"
            )
        self.label_padding_value = int(label_padding_value)

    def _pad(self, image, label, height: int, width: int):
        fill = _per_channel(type(self).__name__, "im_padding_value", self.im_padding_value)
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            fill = np.clip(np.round(fill), info.min, info.max)
        padded = np.empty((height, width) + image.shape[2:], dtype=image.dtype)
        padded[...] = fill.astype(image.dtype) if fill.size > 1 else fill[0]
        padded[: image.shape[0], : image.shape[1]] = image
        if label is not None:
            padded_label = np.full((height, width), self.label_padding_value, dtype=label.dtype)
            padded_label[: label.shape[0], : label.shape[1]] = label
            label = padded_label
        return padded, label

    def __call__(self, image, label, rng):
        rng = _require_rng(rng, type(self).__name__)
        crop_w, crop_h = self.crop_size
        height, width = image.shape[:2]
        if height < crop_h or width < crop_w:
            image, label = self._pad(image, label, max(height, crop_h), max(width, crop_w))
            height, width = image.shape[:2]
        top = int(rng.integers(height - crop_h + 1))
        left = int(rng.integers(width - crop_w + 1))
        window = (slice(top, top + crop_h), slice(left, left + crop_w))
        image = np.ascontiguousarray(image[window])
        label = None if label is None else np.ascontiguousarray(label[window])
        return image, label


class RandomCrop(RandomPaddingCrop):
    """Same as RandomPaddingCrop, under the name our configs use."""


# --- photometric transforms (image only) -----------------------------------------------------


def _blend(image: np.ndarray, other: np.ndarray | float, factor: float) -> np.ndarray:
    """`other + factor * (image - other)`, clipped: PIL ImageEnhance's formula."""
    return np.clip(other + factor * (image - other), 0.0, 255.0)


def _grey(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an RGB float image, (H, W, 1)."""
    return (image @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return _blend(image, 0.0, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    return _blend(image, float(_grey(image).mean()), factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    return _blend(image, _grey(image), factor)


def adjust_hue(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate the hue by `degrees`; float HSV keeps S and V exact (uint8 HSV would round them)."""
    hsv = cv2.cvtColor(image / 255.0, cv2.COLOR_RGB2HSV)  # float H is in degrees [0, 360)
    hsv[..., 0] = np.mod(hsv[..., 0] + degrees, 360.0)
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0, 0.0, 255.0)


_DISTORTIONS = (
    ("brightness", adjust_brightness),
    ("contrast", adjust_contrast),
    ("saturation", adjust_saturation),
    ("hue", adjust_hue),
)


class RandomDistort(Transform):
    """Random brightness, contrast, saturation and hue changes, each with its own probability.

    The four are tried in a random order, as in PaddleX. Factors are drawn from
    [1 - range, 1 + range]; hue is a shift of [-hue_range, hue_range] degrees. Works on uint8
    RGB images (so place it before Normalize) and returns uint8; the label is untouched.
    """

    random = True

    def __init__(
        self,
        brightness_range: float = 0.5,
        brightness_prob: float = 0.5,
        contrast_range: float = 0.5,
        contrast_prob: float = 0.5,
        saturation_range: float = 0.5,
        saturation_prob: float = 0.5,
        hue_range: float = 18,
        hue_prob: float = 0.5,
    ):
        owner = type(self).__name__
        self.brightness_range = _check_non_negative(owner, "brightness_range", brightness_range)
        self.brightness_prob = _check_prob(owner, "brightness_prob", brightness_prob)
        self.contrast_range = _check_non_negative(owner, "contrast_range", contrast_range)
        self.contrast_prob = _check_prob(owner, "contrast_prob", contrast_prob)
        self.saturation_range = _check_non_negative(owner, "saturation_range", saturation_range)
        self.saturation_prob = _check_prob(owner, "saturation_prob", saturation_prob)
        self.hue_range = _check_non_negative(owner, "hue_range", hue_range)
        self.hue_prob = _check_prob(owner, "hue_prob", hue_prob)

    def _draw(self, name: str, rng: np.random.Generator) -> float:
        """A factor around 1 (brightness, contrast, saturation) or a hue shift around 0."""
        spread = getattr(self, f"{name}_range")
        centre = 0.0 if name == "hue" else 1.0
        return float(rng.uniform(centre - spread, centre + spread))

    def __call__(self, image, label, rng):
        rng = _require_rng(rng, type(self).__name__)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                "RandomDistort needs a uint8 (H, W, 3) RGB image, got "
                f"{image.dtype} {image.shape}; put it before Normalize in the pipeline"
            )
        result = image.astype(np.float32)
        for index in rng.permutation(len(_DISTORTIONS)):
            name, adjust = _DISTORTIONS[index]
            # Draw the coin and the amount even when skipped, so one distortion's outcome
            # does not shift the random numbers the others get.
            apply, amount = rng.random() < getattr(self, f"{name}_prob"), self._draw(name, rng)
            if apply:
                result = adjust(result, amount)
        return np.round(result).astype(np.uint8), label


class Normalize(Transform):
    """Scale to [0, 1] with min_val/max_val, then (x - mean) / std; returns float32 HWC.

    With the defaults, 0 maps to -1 and 255 to 1. The label is untouched.
    """

    def __init__(
        self,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        min_val: Sequence[float] = (0, 0, 0),
        max_val: Sequence[float] = (255.0, 255.0, 255.0),
    ):
        owner = type(self).__name__
        self.mean, self.std = mean, std
        self.min_val, self.max_val = min_val, max_val
        self._mean = _per_channel(owner, "mean", mean)
        self._std = _per_channel(owner, "std", std)
        self._min = _per_channel(owner, "min_val", min_val)
        self._range = _per_channel(owner, "max_val", max_val) - self._min
        if (self._std == 0).any():
            raise ValueError(f"{owner}: std must not contain 0, got {std!r}")
        if (self._range <= 0).any():
            raise ValueError(
                f"{owner}: max_val must be larger than min_val, got {max_val!r} and {min_val!r}"
            )

    def __call__(self, image, label, rng):
        scaled = (image.astype(np.float32) - self._min) / self._range
        return ((scaled - self._mean) / self._std).astype(np.float32), label


# --- composition, registry and builders ------------------------------------------------------


class Compose(Transform):
    """Apply `transforms` in order, threading one rng through all of them."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)
        self.random = any(getattr(t, "random", True) for t in self.transforms)

    def __call__(self, image, label=None, rng=None):
        if image.ndim != 3:
            raise ValueError(f"image must be (H, W, C), got shape {image.shape}")
        if label is not None and label.shape != image.shape[:2]:
            raise ValueError(
                f"label shape {label.shape} does not match image shape {image.shape[:2]} (H, W)"
            )
        if rng is None and self.random:
            random_ones = [type(t).__name__ for t in self.transforms if getattr(t, "random", True)]
            raise TypeError(
                f"{', '.join(random_ones)} {'is' if len(random_ones) == 1 else 'are'} random: "
                "pass rng=np.random.default_rng(seed)"
            )
        for transform in self.transforms:
            image, label = transform(image, label, rng)
        return image, label

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"

    def __len__(self) -> int:
        return len(self.transforms)


TRANSFORMS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        RandomHorizontalFlip,
        RandomVerticalFlip,
        RandomDistort,
        RandomPaddingCrop,
        RandomCrop,
        Resize,
        ResizeStepScaling,
        Normalize,
    )
}


def build_transform(spec: dict, where: str = "transform") -> Transform:
    """One transform from `{"type": name, **kwargs}`; `where` ("augment[2]") prefixes errors."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(
            f"{where}: expected a mapping with a 'type' key like "
            f"{{type: RandomHorizontalFlip, prob: 0.5}}, got {spec!r}"
        )
    kwargs = dict(spec)
    name = kwargs.pop("type")
    if name not in TRANSFORMS:
        close = difflib.get_close_matches(str(name), TRANSFORMS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{where}: unknown transform {name!r}.{hint} Known transforms: {', '.join(TRANSFORMS)}"
        )
    cls = TRANSFORMS[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{where} ({name}): unknown argument {unknown[0]!r}.{hint} "
            f"Valid arguments: {', '.join(valid) or '(none)'}"
        )
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def build_transforms(specs: Sequence[dict], where: str = "transforms") -> Compose:
    """A Compose from a list of `{"type": name, **kwargs}` specs, e.g. a config's `augment` list."""
    if isinstance(specs, (str, dict)) or not isinstance(specs, Sequence):
        raise ValueError(f"{where}: expected a list of transforms, got {specs!r}")
    return Compose([build_transform(spec, f"{where}[{i}]") for i, spec in enumerate(specs)])


# --- the study's augmentation sets and the pipelines around them ----------------------------

TRAIN_SIZE = "train_size"
"""A crop_size of "train_size" in an augmentation list means the training size."""

AUGMENT_SETS: dict[str, list[dict]] = {
    "none": [],
    "flip": [{"type": "RandomHorizontalFlip", "prob": 0.5}],
    "flip_distort_crop": [
        {"type": "RandomHorizontalFlip", "prob": 0.5},
        {"type": "RandomDistort"},
        # Zoom in by 1x, 1.25x or 1.5x, then crop back to the training size: a random
        # sub-window at a scale close to evaluation's (1x keeps the whole image).
        {
            "type": "ResizeStepScaling",
            "min_scale_factor": 1.0,
            "max_scale_factor": 1.5,
            "scale_step_size": 0.25,
        },
        {"type": "RandomPaddingCrop", "crop_size": TRAIN_SIZE},
    ],
}

# Added by the pipelines themselves; listing them in `augment` would apply them twice.
_PIPELINE_OWNED = ("Resize", "Normalize")


def _fill_train_size(specs: Sequence[dict], size: tuple[int, int]) -> list[dict]:
    specs = copy.deepcopy(list(specs))
    for spec in specs:
        if isinstance(spec, dict) and spec.get("crop_size") == TRAIN_SIZE:
            spec["crop_size"] = list(size)
    return specs


def augment_set(name: str, size: tuple[int, int]) -> list[dict]:
    """The specs of augmentation set `name`, with crops at `size` = (width, height).

    Returns a fresh list each call, safe to change.
    """
    if name not in AUGMENT_SETS:
        close = difflib.get_close_matches(str(name), AUGMENT_SETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown augmentation set {name!r}.{hint} Known sets: {', '.join(AUGMENT_SETS)}, "
            "or give a list of transforms"
        )
    return _fill_train_size(AUGMENT_SETS[name], _width_height("augment_set", "size", size))


def train_pipeline(augment: Union[str, Sequence[dict]], size: tuple[int, int]) -> Compose:
    """The training pipeline: `Resize(size)`, then the augmentations, then `Normalize()`.

    Resizing first means every augmentation sees the image at the scale the model is
    evaluated at, so a crop (after `ResizeStepScaling` of 1-1.5x) picks a sub-window without
    changing the defects' apparent size much, and the output is always `size`, ready to
    batch. It is also cheaper: distortions run on the small image. `augment` is a set name
    from AUGMENT_SETS or a list of specs; it must not contain Resize or Normalize, which the
    pipeline adds. A crop_size of "train_size" in a list means `size`.
    """
    size = _width_height("train_pipeline", "size", size)
    if isinstance(augment, str):
        specs = augment_set(augment, size)
    else:
        specs = _fill_train_size(augment, size)
        types = [spec.get("type") for spec in specs if isinstance(spec, dict)]
        owned = [name for name in types if name in _PIPELINE_OWNED]
        if owned:
            raise ValueError(
                f"augment: remove {', '.join(owned)}; the training pipeline already adds "
                f"Resize(target_size={list(size)}) first and Normalize() last"
            )
    augmentations = build_transforms(specs, where="augment").transforms
    return Compose([Resize(size), *augmentations, Normalize()])


def eval_pipeline(size: tuple[int, int]) -> Compose:
    """Evaluation and inference: `Resize(size)` then `Normalize()`; no randomness."""
    return Compose([Resize(_width_height("eval_pipeline", "size", size)), Normalize()])
