"""The MLflow pyfunc wrapper of an export folder, logged as code (MLflow "models from code").

`steel_seg.tracking.register_export` logs this file with the export folder as the artifact
`export`; MLflow runs it when the model is loaded (`mlflow.pyfunc.load_model`, `mlflow models
serve`), so no live object is pickled. Besides `steel_seg.tracking` this is the only module
allowed to import mlflow; nothing else in `steel_seg.deploy` imports it, so a plain `Predictor`
still needs no MLflow. Serving needs steel_seg installed (e.g. `--env-manager local`).

Input: a DataFrame with a column `image`, one encoded image (JPEG/PNG/...) per row, as base64
text (what JSON requests carry) or raw bytes. Output: one row per image with `height`, `width`,
`mask_png` (base64 of a lossless PNG of the (H, W) uint8 class-id mask) and `pixels_<class>`
(how many pixels got each defect class).
"""

from __future__ import annotations

import base64
import binascii

import cv2
import mlflow
import numpy as np
import pandas as pd

from steel_seg.deploy.images import UnreadableImage, decode_rgb
from steel_seg.deploy.predictor import Predictor

IMAGE_COLUMN = "image"


def pixel_column(class_name: str) -> str:
    return f"pixels_{class_name}"


def encode_mask_png(mask: np.ndarray) -> str:
    """Base64 of a PNG of the uint8 class-id mask; PNG is lossless, so it decodes back exactly."""
    ok, png = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=np.uint8))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {mask.shape} mask as PNG")
    return base64.b64encode(png.tobytes()).decode("ascii")


def decode_mask_png(text: str) -> np.ndarray:
    """The (H, W) uint8 class-id mask of a `mask_png` value."""
    return cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)


def image_bytes(value, name: str) -> bytes:
    """Encoded image bytes from a base64 string or raw bytes; anything else raises naming `name`."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise UnreadableImage(
                name, "not valid base64; send the encoded image file (JPEG/PNG) as base64 text"
            ) from None
    raise UnreadableImage(
        name, f"expected base64 text or bytes of an encoded image, got {type(value).__name__}"
    )


class SteelSegModel(mlflow.pyfunc.PythonModel):
    """Runs `Predictor` on the export folder logged with the model as the artifact `export`."""

    def load_context(self, context):
        self.predictor = Predictor(context.artifacts["export"])

    # A DataFrame hint: MLflow then validates input against the logged signature, no more.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            got = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise ValueError(
                f"steel_seg model input must be a DataFrame with a column {IMAGE_COLUMN!r} "
                f"(base64 of JPEG/PNG bytes, one image per row); got {got}"
            )
        # Rows are numbered by position: that is what a caller can find in the list they sent.
        images = [
            decode_rgb(image_bytes(value, f"row {i}"), name=f"row {i}")
            for i, value in enumerate(model_input[IMAGE_COLUMN].tolist())
        ]
        classes = self.predictor.class_names
        rows = []
        for (mask, _), image in zip(self.predictor.predict_arrays(images), images):
            counts = np.bincount(mask.ravel(), minlength=len(classes))
            row = {"height": int(image.shape[0]), "width": int(image.shape[1]), "mask_png": encode_mask_png(mask)}
            row.update({pixel_column(name): int(counts[c]) for c, name in enumerate(classes) if c > 0})
            rows.append(row)
        columns = ["height", "width", "mask_png", *(pixel_column(name) for name in classes[1:])]
        return pd.DataFrame(rows, columns=columns)


mlflow.models.set_model(SteelSegModel())
