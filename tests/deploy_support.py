"""Shared by the deploy tests: models trained a few steps (non-degenerate logits) and exports.

A backend check on freshly initialised weights proves little (HRNet-W18's logits start near
1e-12), so every export under test comes from a model that took a few optimiser steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ["background", "defect_1", "defect_2", "defect_3", "defect_4"]

ARCHITECTURES = {
    "UNet": ("UNet", None),
    "DeepLabV3-R50": ("DeepLabV3", {"type": "ResNet50_vd", "output_stride": 8}),
    "HRNet-W18": ("FCN", {"type": "HRNet_W18"}),
    "FastSCNN": ("FastSCNN", None),
}


def toy_images(count: int, height: int, width: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Grey textured images with bright/dark rectangles, and their class-id labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(count):
        image = rng.integers(90, 140, (height, width, 3), dtype=np.uint8)
        label = np.zeros((height, width), np.uint8)
        r, c = rng.integers(0, height // 2), rng.integers(0, width // 2)
        cls = 1 + i % 4
        label[r:r + height // 3, c:c + width // 3] = cls
        image[label == cls] = 40 + 50 * cls
        images.append(image)
        labels.append(label)
    return images, labels


def trained_weights(model_type: str, backbone: dict | None, path: Path, size=(64, 32), steps: int = 3) -> Path:
    """Train `steps` Momentum steps with cross-entropy on toy images; save the state dict."""
    import paddle

    from steel_seg.checkpoint import atomic_save
    from steel_seg.deploy.preprocess import model_input
    from steel_seg.deploy.spec import Preprocess
    from steel_seg.losses import build_loss
    from steel_seg.models import build_model
    from steel_seg.tta import main_logits

    paddle.seed(0)
    model = build_model(model_type, len(CLASSES), dict(backbone) if backbone else None)
    loss_fn = build_loss([("CrossEntropyLoss", 1.0)])
    optimizer = paddle.optimizer.Momentum(0.05, momentum=0.9, parameters=model.parameters())
    images, labels = toy_images(4, size[1], size[0])
    x = paddle.to_tensor(model_input(images, Preprocess(size=size)))
    y = paddle.to_tensor(np.stack(labels).astype("int64"))
    model.train()
    for _ in range(steps):
        loss = loss_fn(main_logits(model(x)), y)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    atomic_save(model.state_dict(), path)
    return path
