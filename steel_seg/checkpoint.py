"""Checkpoints written atomically: a temporary file in the same folder, then a rename.

A crash mid-write leaves the previous checkpoint intact, never a half-written file.
`last.pdckpt` holds everything to resume (model, optimizer, scheduler, progress);
`best.pdparams` holds only the best model's weights, loadable by PaddleSeg too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import paddle

LAST = "last.pdckpt"
BEST = "best.pdparams"


def atomic_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        paddle.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _rename_keys(state: dict, names: dict[str, str]) -> dict:
    """Rename optimizer-state keys that start with a parameter name (`<param>_velocity_0`).

    Paddle keys optimizer state by a parameter's global name (`conv2d_94.w_0`), which depends
    on how many layers the process created before; the structured name (`head.conv.weight`)
    does not. Longest names first, so `conv2d_9.w_0` never claims `conv2d_94.w_0_...`.
    """
    ordered = sorted(names, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = _rename_keys(value, names)
            continue
        match = next((n for n in ordered if key == n or key.startswith(n + "_")), None)
        out[names[match] + key[len(match):] if match else key] = value
    return out


def portable_optimizer_state(model, optimizer) -> dict:
    return _rename_keys(optimizer.state_dict(), {p.name: f"@{n}" for n, p in model.named_parameters()})


def restore_optimizer_state(model, optimizer, state: dict) -> None:
    optimizer.set_state_dict(_rename_keys(state, {f"@{n}": p.name for n, p in model.named_parameters()}))


def save_training_state(path: Path, model, optimizer, scheduler, progress: dict) -> None:
    atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": portable_optimizer_state(model, optimizer),
            "scheduler": scheduler.state_dict(),
            "progress": progress,
        },
        path,
    )


def load_training_state(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    state = paddle.load(str(path))
    if not isinstance(state, dict) or not {"model", "optimizer", "progress"} <= set(state):
        raise ValueError(f"{path}: not a steel_seg training checkpoint")
    return state


def load_weights(model: paddle.nn.Layer, path: Path) -> None:
    """Load a weights file (or the model part of a training checkpoint) strictly."""
    state = paddle.load(str(path))
    if isinstance(state, dict) and "model" in state and "progress" in state:
        state = state["model"]
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit this model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}); was it trained with another model type?"
        )
    model.set_state_dict(state)
