"""`python tests/ddp_entry.py CONFIG ...`: steel_seg.run with a test model, for the data-parallel tests.

Registers `TinyConvNet` (two convolutions, no BatchNorm: Paddle has no SyncBatchNorm on CPU,
and per-rank BatchNorm statistics would make 2 processes differ from 1) in PaddleSeg's model
registry, as a user registers their own model, then runs steel_seg.run. The test hooks are
driven by environment variables:
- DDP_TEST_CALLS: a folder; each rank writes `rank<N>.txt` listing the files it saved with
  paddle.save and every MlflowClient it created, so a test can check that only rank 0 did.
- DDP_TEST_DIE_AT: "RANK:EPOCH": that rank exits abruptly at the first step of that epoch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import paddle
from paddleseg.cvlibs import manager


class TinyConvNet(paddle.nn.Layer):
    def __init__(self, num_classes: int, channels: int = 8):
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(3, channels, 3, padding=1)
        self.conv2 = paddle.nn.Conv2D(channels, num_classes, 3, padding=1)

    def forward(self, x):
        return [self.conv2(paddle.nn.functional.relu(self.conv1(x)))]


if "TinyConvNet" not in manager.MODELS.components_dict:
    manager.MODELS.add_component(TinyConvNet)


def _rank() -> int:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def _install_hooks() -> None:
    calls_dir = os.environ.get("DDP_TEST_CALLS")
    if calls_dir:
        log = Path(calls_dir) / f"rank{_rank()}.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.touch()

        def note(line: str) -> None:
            with log.open("a") as f:
                f.write(line + "\n")

        real_save = paddle.save

        def save(obj, path, *args, **kwargs):
            note(f"save {path}")
            return real_save(obj, path, *args, **kwargs)

        paddle.save = save
        import steel_seg.tracking as tracking

        real_client = tracking.MlflowClient

        def client(*args, **kwargs):
            note("mlflow client")
            return real_client(*args, **kwargs)

        tracking.MlflowClient = client

    die_at = os.environ.get("DDP_TEST_DIE_AT")
    if die_at:
        rank, epoch = (int(v) for v in die_at.split(":"))
        if rank == _rank():
            from steel_seg.trainer import Trainer

            real_epoch = Trainer._train_epoch

            def train_epoch(self, number, bar):
                if number == epoch:
                    print(f"test: rank {rank} exits abruptly at epoch {epoch}", flush=True)
                    os._exit(3)
                return real_epoch(self, number, bar)

            Trainer._train_epoch = train_epoch


if __name__ == "__main__":
    _install_hooks()
    from steel_seg.run import main

    sys.exit(main(sys.argv[1:]))
