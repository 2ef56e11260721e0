"""Scoring an export folder on a data split, with the metrics training reports.

Two resolutions: the training size (the same resized images and labels the run was scored on,
so the mIoU must equal the run's logged one: proof the export is the measured model), and the
original size (what the line sees: upsampled probabilities and post-processing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from steel_seg.deploy.images import read_rgb
from steel_seg.deploy.preprocess import normalise
from steel_seg.metrics import SegmentationEvaluator


@dataclass
class ExportScores:
    scores: dict
    images: int
    ms_per_image: float


def score_at_model_size(predictor, data, split: str, batch_size: int = 8, progress: bool = True) -> ExportScores:
    """Scores on the cached, resized split, exactly as the run's final evaluation saw it."""
    cache, pre = data.cache, predictor.spec.preprocess
    if tuple(cache.images.shape[2:0:-1]) != tuple(pre.size):
        raise ValueError(
            f"the data cache is {cache.images.shape[2]}x{cache.images.shape[1]} but the export's input is "
            f"{pre.size[0]}x{pre.size[1]}: use the training config the export came with"
        )
    rows = [cache.index_of(s) for s in data.split(split)]
    evaluator = SegmentationEvaluator(predictor.spec.num_classes, class_names=predictor.class_names)
    seconds = 0.0
    for start in tqdm(range(0, len(rows), batch_size), desc=f"{split} at model size", disable=not progress):
        chunk = rows[start:start + batch_size]
        batch = np.stack([normalise(np.asarray(cache.images[r]), pre) for r in chunk])
        begin = time.perf_counter()
        pred = predictor.model_probs(batch).argmax(axis=1)
        seconds += time.perf_counter() - begin
        evaluator.update(pred, np.stack([np.asarray(cache.labels[r]) for r in chunk]))
    return ExportScores(evaluator.result(), len(rows), 1000 * seconds / max(len(rows), 1))


def score_at_original_size(predictor, data, split: str, progress: bool = True) -> ExportScores:
    """Scores of the full predict path (resize, engine, upsampling, post-processing) on the originals."""
    evaluator = SegmentationEvaluator(predictor.spec.num_classes, class_names=predictor.class_names)
    samples = data.split(split)
    seconds = 0.0
    for sample in tqdm(samples, desc=f"{split} at original size", disable=not progress):
        image = read_rgb(sample.image)
        begin = time.perf_counter()
        (mask, _), = predictor.predict_arrays([image])
        seconds += time.perf_counter() - begin
        evaluator.update(mask, data.read_label(sample))
    return ExportScores(evaluator.result(), len(samples), 1000 * seconds / max(len(samples), 1))
