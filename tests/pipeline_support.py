"""The tiny experiment the pipeline tests' studies point at (FastSCNN, 64x32, 2 steps)."""

from pathlib import Path

import yaml


def write_tiny_experiment(tmp_path: Path, kaggle_root: Path, uri: str, experiment: str) -> Path:
    config = {
        "name": "tiny",
        "data": {"root": str(kaggle_root), "work_dir": str(tmp_path / "work"), "size": [64, 32], "fallback_to_demo": False},
        "model": {"type": "FastSCNN"},
        "train": {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 2, "output_dir": str(tmp_path / "outputs")},
        "eval": {"num_overlays": 1},
        "tracking": {"uri": uri, "experiment": experiment},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
