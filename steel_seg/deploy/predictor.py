"""`Predictor`: an export folder in, class-id masks at the original resolution out.

Imports only Paddle Inference (or ONNX Runtime, when chosen), NumPy, OpenCV and PyYAML; a test
checks that no training code and no MLflow is loaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np

from steel_seg.deploy import tta as tta_views
from steel_seg.deploy.backends import choose_backend, open_engine
from steel_seg.deploy.images import as_rgb, decode_rgb, read_rgb
from steel_seg.deploy.postprocess import probs_to_mask, upsample_probs
from steel_seg.deploy.preprocess import model_input
from steel_seg.deploy.spec import DeploySpec, SpecError, read_spec

ImageInput = Union[str, Path, bytes, np.ndarray]


@dataclass
class Prediction:
    name: str
    mask: np.ndarray
    """(H, W) uint8 class ids at the image's own resolution."""
    probs: np.ndarray | None = None
    """(C, H, W) float32 merged probabilities, when asked for."""


def load_image(item: ImageInput, name: str | None = None) -> tuple[str, np.ndarray]:
    """(name, RGB array) from a path, encoded bytes or an array; bad input raises UnreadableImage."""
    if isinstance(item, (str, Path)):
        return str(item), read_rgb(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        return label, decode_rgb(bytes(item), label)
    label = name or "<array>"
    return label, as_rgb(item, label)


# Engines that run an exported program only at the size it was exported with (measured: ONNX
# Runtime rejects other sizes, OpenVINO prints an error); Paddle Inference plain and oneDNN resize.
FIXED_SIZE_BACKENDS = ("onnxruntime", "openvino", "tensorrt")


def tta_plan(spec: DeploySpec, views=None, merge: str | None = None, weights=None) -> tta_views.TTAPlan:
    """The TTA plan of deploy.yaml, or of the given views (then merge and weights as given)."""
    norm = tta_views.Normalisation(tuple(spec.preprocess.mean), tuple(spec.preprocess.std))
    if views is None:
        views = spec.tta.get("views", [])
        merge = merge or spec.tta.get("merge", "mean")
        weights = weights if weights is not None else spec.tta.get("weights")
    return tta_views.resolve(views, merge or "mean", weights, norm)


class Predictor:
    """Runs an exported model: preprocessing, batched inference, TTA, post-processing.

    backend: `auto` (the fastest that passed its check at export) or a name from deploy.yaml.
    tta: view names (e.g. ["hflip", "blur:3"]); None uses deploy.yaml's views, merge and
    weights; [] turns TTA off. The views of a batch run as one engine call per input size.
    """

    def __init__(
        self,
        folder: str | Path,
        backend: str = "auto",
        threads: int | None = None,
        tta: Sequence[str] | None = None,
        tta_merge: str | None = None,
        tta_weights: Sequence[float] | None = None,
        batch_size: int = 8,
        postprocess: bool = True,
    ):
        self.folder = Path(folder)
        self.spec: DeploySpec = read_spec(self.folder)
        self.backend = choose_backend(self.spec, backend)
        self.threads = threads
        self.engine = open_engine(self.folder, self.backend, threads)
        self.tta = tta_plan(self.spec, tta, tta_merge, tta_weights)
        resizing = [v.name for v in self.tta.views if v.changes_size]
        if resizing and self.backend in FIXED_SIZE_BACKENDS:
            width, height = self.spec.preprocess.size
            raise SpecError(
                f"TTA view(s) {', '.join(resizing)} change the input size, but backend {self.backend} runs the program at its "
                f"exported size {width}x{height} only; use backend paddle or onednn, or drop the view(s)"
            )
        # The engine is looked up per call, so a caller may swap `engine` (the speed bench puts the
        # training-time model there to compare it on exactly this pre/post-processing).
        self.runner = tta_views.ViewRunner(lambda batch: self.engine.run(batch), batched=bool(self.spec.tta.get("batched", True)))
        self.batch_size = max(1, batch_size)
        self.postprocess = postprocess

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.classes)

    # -- at model size -----------------------------------------------------------------------

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits (N, C, h, w) for a preprocessed batch; no TTA."""
        return self.engine.run(batch)

    @property
    def views(self) -> list[str]:
        return [v.name for v in self.tta.views]

    def model_probs(self, batch: np.ndarray) -> np.ndarray:
        """Softmax probabilities at model size, merged over the TTA views."""
        return self.runner.probs(batch, self.tta)

    # -- at the original size ----------------------------------------------------------------

    def _masks(self, images: list[np.ndarray], return_probs: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
        probs = self.model_probs(model_input(images, self.spec.preprocess))
        post = self.spec.postprocess
        thresholds = post.thresholds if self.postprocess else None
        min_areas = post.min_areas if self.postprocess else None
        out = []
        for image, p in zip(images, probs):
            full = upsample_probs(p, image.shape[1], image.shape[0])
            out.append((probs_to_mask(full, thresholds, min_areas), full if return_probs else None))
        return out

    def predict_arrays(self, images: Sequence[np.ndarray], return_probs: bool = False) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(mask, probs or None) for RGB uint8 arrays, batched by `batch_size`."""
        results = []
        for start in range(0, len(images), self.batch_size):
            results.extend(self._masks(list(images[start:start + self.batch_size]), return_probs))
        return results

    def predict(self, inputs: Iterable[ImageInput], return_probs: bool = False) -> list[Prediction]:
        """Masks for paths, encoded bytes or arrays; the first unreadable input raises, naming it."""
        loaded = [load_image(item) for item in inputs]
        results = self.predict_arrays([image for _, image in loaded], return_probs)
        return [Prediction(name, mask, probs) for (name, _), (mask, probs) in zip(loaded, results)]

    def predict_one(self, item: ImageInput, return_probs: bool = False) -> Prediction:
        return self.predict([item], return_probs)[0]

    def time_per_image(self, images: Sequence[np.ndarray], repeats: int = 3) -> float:
        """Median ms per image of the whole path (after one warm-up pass)."""
        self.predict_arrays(images[:1])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.predict_arrays(images)
            times.append((time.perf_counter() - start) * 1000 / len(images))
        return float(np.median(times))
