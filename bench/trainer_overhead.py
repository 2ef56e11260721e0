"""Our trainer's time per step against a bare Paddle loop on the same model and batches.

    python bench/trainer_overhead.py [--model UNet] [--size 200 32] [--batch 4] [--steps 20] [--rounds 2]

The bare loop is the minimum any training needs: forward, loss, backward, optimizer step,
scheduler step, over batches already in memory. The trainer runs one epoch of the same
number of steps through our BatchLoader (cache read, flip, normalise), with its progress bar,
loss checks, per-term logging, the end-of-epoch checkpoint and a one-batch validation. Both
start from the same weights; rounds alternate (bare, trainer, bare, trainer, ...) and the
best time of each is compared, so machine load affects both alike.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paddle  # noqa: E402

from steel_seg.config.schema import DataConfig  # noqa: E402
from steel_seg.data.loader import BatchLoader  # noqa: E402
from steel_seg.data.prepare import prepare_data  # noqa: E402
from steel_seg.data.synthetic import generate_dataset  # noqa: E402
from steel_seg.losses import build_loss  # noqa: E402
from steel_seg.models import build_model  # noqa: E402
from steel_seg.trainer import Trainer, TrainSettings  # noqa: E402
from steel_seg.transforms import eval_pipeline, train_pipeline  # noqa: E402


def bare_loop(model, loss_fn, batches, settings: TrainSettings) -> float:
    scheduler = paddle.optimizer.lr.PolynomialDecay(settings.learning_rate, len(batches), power=settings.lr_power)
    optimizer = paddle.optimizer.Momentum(
        scheduler, momentum=settings.momentum, parameters=model.parameters(),
        weight_decay=paddle.regularizer.L2Decay(settings.weight_decay),
    )
    model.train()
    start = time.perf_counter()
    for images, labels in batches:
        loss = loss_fn(model(images)[0], labels)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        scheduler.step()
    float(loss)  # wait for the last step
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="UNet")
    parser.add_argument("--size", type=int, nargs=2, default=[200, 32], metavar=("W", "H"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    paddle.set_device("cpu")
    size = tuple(args.size)

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_dataset(Path(tmp) / "kaggle", num_images=max(60, 3 * args.batch * args.steps // 2), seed=0)
        data = prepare_data(DataConfig(root=root, work_dir=Path(tmp) / "work", size=size, include_defect_free=True), progress=False)
        settings = TrainSettings(epochs=1, eval_interval=1)
        loss_fn = build_loss([("CrossEntropyLoss", 1.0)])

        def loader():
            return BatchLoader(data.cache, data.train, train_pipeline("flip", size), args.batch, shuffle=True,
                               drop_last=True, seed=0, max_batches=args.steps)

        # The bare loop gets exactly the batches the trainer's loader produces in epoch 1.
        prepared = loader()
        prepared.set_epoch(1)
        batches = [(paddle.to_tensor(b.images), paddle.to_tensor(b.labels)) for b in prepared]
        assert len(batches) == args.steps, f"only {len(batches)} batches; lower --steps or --batch"
        val = BatchLoader(data.cache, data.val[: args.batch], eval_pipeline(size), args.batch)

        paddle.seed(0)
        initial = {k: v.numpy() for k, v in build_model(args.model, data.num_classes).state_dict().items()}

        def fresh_model():
            model = build_model(args.model, data.num_classes)
            model.set_state_dict(initial)
            return model

        bare_times, trainer_times = [], []
        for round_ in range(args.rounds):
            bare_times.append(bare_loop(fresh_model(), loss_fn, batches, settings))
            trainer = Trainer(fresh_model(), loss_fn, loader(), val, settings, Path(tmp) / f"ckpt{round_}",
                              num_classes=data.num_classes, progress_bars=True)
            start = time.perf_counter()
            trainer.fit()
            trainer_times.append(time.perf_counter() - start)
            print(f"round {round_ + 1}: bare {bare_times[-1]:.2f} s, trainer {trainer_times[-1]:.2f} s", flush=True)

    bare, ours = min(bare_times), min(trainer_times)
    print(f"model {args.model} at {size[0]}x{size[1]}, batch {args.batch}, {args.steps} steps, best of {args.rounds}")
    print(f"bare Paddle loop: {bare / args.steps:.3f} s/step")
    print(f"steel_seg trainer: {ours / args.steps:.3f} s/step (incl. loader, checkpoint, 1-batch validation)")
    print(f"overhead: {100 * (ours / bare - 1):+.1f}% (goal: <= 10%)")


if __name__ == "__main__":
    main()
