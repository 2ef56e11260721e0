"""Test-time augmentation on NumPy batches: views, merges, and the runner that batches them.

A view augments the (normalised, NCHW) model input and undoes its geometric change on the
output; views compose with `+` (`hflip+blur`). Merges combine the de-augmented outputs, on
probabilities (or logits for `logits_mean`), never on hard masks; the argmax comes last. The
runner puts all views of a batch that share an input size through the model in one forward
pass. Evaluation (dygraph) and the Predictor (Paddle Inference, ONNX Runtime) both use this
module, so a deployed model's TTA is the one that was scored.

View names: identity, hflip, vflip, hvflip, blur[:K[:SIGMA]] (Gaussian, K odd, sigma 0 =
OpenCV's default for K; seed 000 blurred 3x3), scale:F (resize the input by F, the outputs
back), brightness:D (add D of the full intensity range), contrast:F (stretch around the image
mean by F). Photometric views clip to the intensity range the model was trained on.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

from steel_seg.deploy.postprocess import softmax

log = logging.getLogger(__name__)

MERGES = ("mean", "weighted", "logits_mean", "gmean", "max")
CV_MAX_CHANNELS = 512  # cv2 functions take at most this many channels in one call


@dataclass(frozen=True)
class Normalisation:
    """How pixels in [0, 1] became model input: (x - mean) / std per channel."""

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def _arrays(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        if mean.shape[1] != channels:
            raise ValueError(f"normalisation has {mean.shape[1]} channels, the batch {channels}")
        return mean, std

    def to_pixels(self, batch: np.ndarray) -> np.ndarray:
        mean, std = self._arrays(batch.shape[1])
        return batch * std + mean

    def from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        mean, std = self._arrays(pixels.shape[1])
        return ((pixels - mean) / std).astype(np.float32)


def _planes(batch: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply an OpenCV image function to every (n, c) plane of an NCHW batch, in few calls."""
    n, c, h, w = batch.shape
    stacked = np.ascontiguousarray(batch.reshape(n * c, h, w).transpose(1, 2, 0))  # H, W, N*C
    chunks = [fn(np.ascontiguousarray(stacked[:, :, i:i + CV_MAX_CHANNELS])) for i in range(0, n * c, CV_MAX_CHANNELS)]
    chunks = [x[:, :, None] if x.ndim == 2 else x for x in chunks]  # cv2 drops a single channel
    out = np.concatenate(chunks, axis=2)
    return np.ascontiguousarray(out.transpose(2, 0, 1).reshape(n, c, out.shape[0], out.shape[1]))


def resize_batch(batch: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of every plane of an NCHW float batch to (height, width)."""
    if batch.shape[2:] == (height, width):
        return batch
    return _planes(batch.astype(np.float32, copy=False), lambda x: cv2.resize(x, (width, height), interpolation=cv2.INTER_LINEAR))


# ---------------------------------------------------------------------------------------------
# Steps: the primitives a view is made of


@dataclass(frozen=True)
class Step:
    """One primitive. `undo` maps an output back to the input size `shape` (h, w) it had."""

    name: str

    def apply(self, batch: np.ndarray, norm: Normalisation) -> np.ndarray:
        raise NotImplementedError

    def undo(self, out: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        return out  # photometric steps move nothing


@dataclass(frozen=True)
class Flip(Step):
    axes: tuple[int, ...] = ()

    def apply(self, batch, norm):
        return np.ascontiguousarray(np.flip(batch, self.axes))

    def undo(self, out, shape):
        return np.ascontiguousarray(np.flip(out, self.axes))


@dataclass(frozen=True)
class Scale(Step):
    factor: float = 1.0

    def apply(self, batch, norm):
        h, w = batch.shape[2:]
        return resize_batch(batch, max(1, round(h * self.factor)), max(1, round(w * self.factor)))

    def undo(self, out, shape):
        return resize_batch(out, *shape)


@dataclass(frozen=True)
class Blur(Step):
    ksize: int = 3
    sigma: float = 0.0

    def apply(self, batch, norm):
        # Gaussian weights sum to 1 and the border is reflected, so blurring the normalised input
        # is blurring the image: (x - m) / s commutes with it.
        return _planes(batch.astype(np.float32, copy=False), lambda x: cv2.GaussianBlur(x, (self.ksize, self.ksize), self.sigma))


@dataclass(frozen=True)
class Brightness(Step):
    delta: float = 0.0

    def apply(self, batch, norm):
        return norm.from_pixels(np.clip(norm.to_pixels(batch) + self.delta, 0.0, 1.0))


@dataclass(frozen=True)
class Contrast(Step):
    factor: float = 1.0

    def apply(self, batch, norm):
        pixels = norm.to_pixels(batch)
        mean = pixels.mean(axis=(1, 2, 3), keepdims=True)  # one grey level per image, as PIL's Contrast
        return norm.from_pixels(np.clip(mean + self.factor * (pixels - mean), 0.0, 1.0))


def _number(view: str, text: str, what: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"TTA view `{view}`: {what} must be a number, got `{text}`") from None
    if not (low <= value <= high) or math.isnan(value):
        raise ValueError(f"TTA view `{view}`: {what} must be in [{low:g}, {high:g}], got {value:g}")
    return value


def _no_args(cls, **fixed):
    def build(view: str, args: list[str]) -> Step:
        if args:
            raise ValueError(f"TTA view `{view}` takes no parameters")
        return cls(**fixed)
    return build


def _blur(view: str, args: list[str]) -> Step:
    if len(args) > 2:
        raise ValueError(f"TTA view `{view}`: blur takes blur:K or blur:K:SIGMA")
    k = _number(view, args[0], "kernel size", 1, 99) if args else 3
    if k != int(k) or int(k) % 2 == 0:
        raise ValueError(f"TTA view `{view}`: kernel size must be an odd whole number, got {args[0]}")
    sigma = _number(view, args[1], "sigma", 0, 50) if len(args) > 1 else 0.0
    name = f"blur:{int(k)}" + (f":{sigma:g}" if len(args) > 1 else "")
    return Blur(name, int(k), sigma)


def _one_number(cls, what: str, low: float, high: float, fmt: str = "{:g}"):
    def build(view: str, args: list[str]) -> Step:
        name = cls.__name__.lower()
        if len(args) != 1:
            raise ValueError(f"TTA view `{view}`: write {name}:{what.upper()} ({what} in [{low:g}, {high:g}])")
        value = _number(view, args[0], what, low, high)
        return cls(f"{name}:{fmt.format(value)}", value)
    return build


# Registry of step names (a plain dict: we own these parts).
STEPS: dict[str, Callable[[str, list[str]], Step]] = {
    "identity": _no_args(Flip, name="identity", axes=()),
    "hflip": _no_args(Flip, name="hflip", axes=(3,)),
    "vflip": _no_args(Flip, name="vflip", axes=(2,)),
    "hvflip": _no_args(Flip, name="hvflip", axes=(2, 3)),
    "blur": _blur,
    "scale": _one_number(Scale, "factor", 0.25, 4.0),
    "brightness": _one_number(Brightness, "delta", -1.0, 1.0),
    "contrast": _one_number(Contrast, "factor", 0.1, 4.0),
}


@dataclass(frozen=True)
class View:
    """Steps applied in order; their geometric changes undone in reverse order."""

    name: str
    steps: tuple[Step, ...] = ()

    @property
    def changes_size(self) -> bool:
        return any(isinstance(s, Scale) for s in self.steps)

    @property
    def is_identity(self) -> bool:
        return all(isinstance(s, Flip) and not s.axes for s in self.steps)

    def augment(self, batch: np.ndarray, norm: Normalisation) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The augmented batch and the input size before each step (for `deaugment`)."""
        shapes = []
        for step in self.steps:
            shapes.append(tuple(batch.shape[2:]))
            batch = step.apply(batch, norm)
        return batch, shapes

    def deaugment(self, out: np.ndarray, shapes: list[tuple[int, int]]) -> np.ndarray:
        for step, shape in zip(reversed(self.steps), reversed(shapes)):
            out = step.undo(out, shape)
        return out


IDENTITY = View("identity", ())


def parse_view(text: str) -> View:
    """`hflip+blur:5` -> View; unknown names and bad parameters are errors that say what is known."""
    parts = [p.strip() for p in re.split(r"\+(?![\d.])", str(text))]  # `brightness:+0.1` is a sign
    if not all(parts):
        raise ValueError(f"TTA view `{text}`: empty part; compose views as `hflip+blur`")
    steps = []
    for part in parts:
        name, *args = [a.strip() for a in part.split(":")]
        if name not in STEPS:
            close = difflib.get_close_matches(name, list(STEPS), n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ValueError(f"unknown TTA view `{name}`.{hint} Known: {', '.join(STEPS)} (parameters as blur:5, scale:1.25)")
        steps.append(STEPS[name](part, args))
    steps = [s for s in steps if not (isinstance(s, Flip) and not s.axes)]  # identity composes to nothing
    if not steps:
        return IDENTITY
    return View("+".join(s.name for s in steps), tuple(steps))


def split_names(names: Sequence[str] | str | None) -> list[str]:
    """Views from a list whose items may be comma-separated (`--tta hflip,blur`)."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    return [n.strip() for item in names for n in str(item).split(",") if n.strip()]


# ---------------------------------------------------------------------------------------------
# Plans and merges


@dataclass(frozen=True)
class TTAPlan:
    """What to run: the views (the original first), how to merge them, and merge weights."""

    views: tuple[View, ...] = (IDENTITY,)
    merge: str = "mean"
    weights: tuple[float, ...] | None = None
    norm: Normalisation = field(default_factory=Normalisation)

    @property
    def is_plain(self) -> bool:
        return len(self.views) == 1 and self.views[0].is_identity

    @property
    def extra_views(self) -> list[str]:
        """Names of the views besides the original, as written in configs."""
        return [v.name for v in self.views[1:]]

    def describe(self) -> str:
        if self.is_plain:
            return "none"
        text = ", ".join(self.extra_views)
        if self.merge == "weighted":
            return f"{text} ({self.merge} {', '.join(f'{w:g}' for w in self.weights)})"
        return f"{text} ({self.merge})"

    def as_spec(self) -> dict:
        """The deploy.yaml / config form: views, merge and (for weighted) weights."""
        spec = {"views": self.extra_views, "merge": self.merge}
        if self.weights is not None:
            spec["weights"] = list(self.weights)
        return spec

    @property
    def uses_logits(self) -> bool:
        return self.merge == "logits_mean"


def resolve(
    names: Sequence[str] | str | None,
    merge: str = "mean",
    weights: Sequence[float] | None = None,
    norm: Normalisation | None = None,
) -> TTAPlan:
    """A plan from view names: the original first, then each named view once.

    `weights` (only with merge `weighted`) has one value per view, the original first, so the
    seed's `0.5 * original + 0.5 * augmented` is `weights: [0.5, 0.5]`.
    """
    if merge not in MERGES:
        close = difflib.get_close_matches(str(merge), MERGES, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise ValueError(f"unknown TTA merge `{merge}`.{hint} Known: {', '.join(MERGES)}")
    views = [IDENTITY]
    for name in split_names(names):
        view = parse_view(name)
        if view not in views:
            views.append(view)
    if merge == "weighted":
        listing = ", ".join(["the original", *[v.name for v in views[1:]]])
        if weights is None:
            raise ValueError(f"TTA merge `weighted` needs weights, one per view with the original first ({listing}), e.g. [0.5, 0.5]")
        weights = tuple(float(w) for w in weights)
        if len(weights) != len(views):
            raise ValueError(f"TTA weights: {len(weights)} value(s) for {len(views)} view(s) ({listing}); give one per view, the original first")
        if any(w < 0 or math.isnan(w) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"TTA weights must be >= 0 with a positive sum, got {list(weights)}")
    elif weights is not None:
        raise ValueError(f"TTA weights are for merge `weighted` (merge is `{merge}`); drop them or set the merge to weighted")
    return TTAPlan(tuple(views), merge, weights, norm or Normalisation())


def merge_outputs(outputs: Sequence[np.ndarray], merge: str = "mean", weights: Sequence[float] | None = None) -> np.ndarray:
    """Merge de-augmented outputs (each N, C, H, W): probabilities, or logits for `logits_mean`.

    Returns per-class scores whose argmax is the prediction (probabilities except for `max`).
    """
    if merge == "logits_mean":
        return softmax(outputs[0] if len(outputs) == 1 else np.mean(np.stack(outputs), axis=0))
    if len(outputs) == 1:
        return outputs[0]
    if merge == "mean":
        return np.mean(np.stack(outputs), axis=0)
    if merge == "weighted":
        total = float(sum(weights))
        merged = outputs[0] * np.float32(weights[0])
        for out, w in zip(outputs[1:], weights[1:]):
            merged = merged + out * np.float32(w)  # in order, so [0.5, 0.5] is 0.5*p0 + 0.5*p1 exactly
        return merged if total == 1.0 else merged / np.float32(total)
    if merge == "gmean":
        merged = np.exp(np.log(np.clip(np.stack(outputs), 1e-8, None)).mean(axis=0))
        return merged / merged.sum(axis=1, keepdims=True)
    if merge == "max":
        return np.max(np.stack(outputs), axis=0)
    raise ValueError(f"unknown TTA merge `{merge}`; known: {', '.join(MERGES)}")


# ---------------------------------------------------------------------------------------------
# Running views through a model


def _out_of_memory(exc: BaseException) -> bool:
    """Paddle raises MemoryError (ResourceExhausted) on CPU and GPU; other engines say it in words."""
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def finish(view: View, logits: np.ndarray, shapes: list, as_logits: bool = False) -> np.ndarray:
    """A view's output back in the original frame: probabilities (softmax first, then the
    geometric undo, so a scale view resizes probabilities) or, for `logits_mean`, logits."""
    out = logits if as_logits else softmax(logits, axis=1)
    return view.deaugment(out, shapes) if shapes else out


class ViewRunner:
    """Runs views through `forward` (NCHW float32 batch -> logits): de-augmented outputs per view.

    Views whose augmented input has the same size go through the model as one batch (one
    forward pass per input size); if that runs out of memory the runner falls back to one
    pass per view for the rest of its life and says so once. `batched=False` starts there.
    """

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], batched: bool = True):
        self.forward = forward
        self.batched = batched
        self.passes = 0  # forward calls so far, for tests and benchmarks

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.passes += 1
        return self.forward(batch)

    def forward_views(self, batch: np.ndarray, views: Sequence[View], norm: Normalisation) -> list[tuple[np.ndarray, list]]:
        """Raw logits of each view (still augmented) and its step shapes, for `finish`."""
        augmented = [view.augment(batch, norm) if not view.is_identity else (batch, []) for view in views]
        raw: list[np.ndarray | None] = [None] * len(views)
        groups: dict[tuple, list[int]] = {}
        for i, (x, _) in enumerate(augmented):
            groups.setdefault(tuple(x.shape[2:]), []).append(i)
        for members in groups.values():
            if self.batched and len(members) > 1:
                try:
                    stacked = self._run(np.concatenate([augmented[i][0] for i in members]))
                except Exception as exc:  # noqa: BLE001 - only memory errors are retried, per view
                    if not _out_of_memory(exc):
                        raise
                    log.warning("TTA: %d views in one forward pass ran out of memory; one pass per view from now on", len(members))
                    self.batched = False
                else:
                    n = len(batch)
                    for k, i in enumerate(members):
                        raw[i] = stacked[k * n:(k + 1) * n]
                    continue
            for i in members:
                raw[i] = self._run(augmented[i][0])
        return [(out, shapes) for out, (_, shapes) in zip(raw, augmented)]

    def outputs(self, batch: np.ndarray, views: Sequence[View], norm: Normalisation, logits: bool = False) -> list[np.ndarray]:
        """De-augmented probabilities (or logits) of each view, in the order of `views`."""
        return [finish(view, out, shapes, logits) for view, (out, shapes) in zip(views, self.forward_views(batch, views, norm))]

    def probs(self, batch: np.ndarray, plan: TTAPlan) -> np.ndarray:
        """Merged per-class scores (N, C, H, W) of `plan` on `batch`; argmax them for the mask."""
        if plan.is_plain:
            return softmax(self._run(batch), axis=1)
        outs = self.outputs(batch, plan.views, plan.norm, logits=plan.uses_logits)
        return merge_outputs(outs, plan.merge, plan.weights)
