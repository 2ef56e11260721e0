"""What TTA costs beyond its extra forward passes: evaluation with and without TTA, same images.

    python bench/tta_speed.py [--model UNet] [--size 200 32] [--batch 4] [--images 24] [--views hflip] [--rounds 3]

Goal: time(TTA) - time(plain) <= 1.05 x (views - 1) x forward time, i.e. loading,
preprocessing, softmax, de-augmentation and merging add (almost) nothing per view. Three things
are timed over the same batches, interleaved round by round (so machine load hits all alike),
best of the rounds:
- plain: `evaluate()` over the loader (cache read, resize, normalise, forward, softmax, argmax,
  metrics), as a whole;
- TTA: the same with the views (batched: one forward pass for all views of a batch);
- forward: the model alone on the batches already in memory (to_tensor, forward, to NumPy);
- merge_only: what TTA adds besides the forward passes (augment, stack, softmax, undo, merge),
  with the model replaced by ready-made logits.
Also shown: TTA with one forward pass per view (`tta_batched: false`), to see what batching
buys here. On CPU a batch of 2N costs about 2x a batch of N, so batching is about even; on GPU
it fills the device better (written, untested here: no GPU).
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

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from steel_seg.config.schema import DataConfig  # noqa: E402
from steel_seg.data.loader import BatchLoader  # noqa: E402
from steel_seg.data.prepare import prepare_data  # noqa: E402
from steel_seg.data.synthetic import generate_dataset  # noqa: E402
from steel_seg.deploy.tta import ViewRunner, resolve  # noqa: E402
from steel_seg.evaluation import evaluate  # noqa: E402
from steel_seg.models import build_model  # noqa: E402
from steel_seg.transforms import eval_pipeline  # noqa: E402
from steel_seg.tta import dygraph_forward  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="UNet")
    parser.add_argument("--size", type=int, nargs=2, default=[200, 32], metavar=("W", "H"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--views", default="hflip", help="views besides the original, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    paddle.set_device("cpu")
    size = tuple(args.size)
    plan = resolve(args.views)
    views = len(plan.views)

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_dataset(Path(tmp) / "kaggle", num_images=max(2 * args.images, 20), seed=0)
        data = prepare_data(DataConfig(root=root, work_dir=Path(tmp) / "work", size=size, include_defect_free=True), progress=False)
        samples = (data.train + data.val + data.test)[: args.images]
        loader = BatchLoader(data.cache, samples, eval_pipeline(size), args.batch)
        in_memory = [b.images for b in loader]
        paddle.seed(0)
        model = build_model(args.model, data.num_classes)
        model.eval()
        forward = dygraph_forward(model)

        def forward_only():
            with paddle.no_grad():
                for images in in_memory:
                    forward(images)

        logits = {len(b) * k: np.zeros((len(b) * k, data.num_classes, *b.shape[2:]), np.float32) for b in in_memory for k in (1, views)}

        def merge_only():
            """Everything TTA does besides the forward passes: augment, stack, softmax, undo, merge."""
            runner = ViewRunner(lambda batch: logits[len(batch)])
            for images in in_memory:
                runner.probs(images, plan)

        def run(tta=None, batched=True):
            return lambda: evaluate(model, loader, data.num_classes, tta=tta, progress=False, batched=batched)

        contenders = {"plain": run(), "tta": run(plan), "tta_per_view": run(plan, batched=False), "forward": forward_only, "merge_only": merge_only}
        forward_only()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for round_ in range(args.rounds):
            for name, fn in contenders.items():
                times[name].append(timed(fn))
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)

    best = {name: min(t) for name, t in times.items()}
    median = {name: float(np.median(t)) for name, t in times.items()}
    n = len(samples)
    extra, allowed = best["tta"] - best["plain"], 1.05 * (views - 1) * best["forward"]
    print(f"model {args.model} at {size[0]}x{size[1]}, batch {args.batch}, {n} images, TTA {plan.describe()} "
          f"({views} views), best of {args.rounds} interleaved rounds")
    for name in ("plain", "tta", "tta_per_view", "forward", "merge_only"):
        print(f"  {name:<13} {best[name]:7.2f} s  {1000 * best[name] / n:7.1f} ms/image")
    print(f"TTA / plain: {best['tta'] / best['plain']:.2f}x (batched), {best['tta_per_view'] / best['plain']:.2f}x (one pass per view)")
    print(f"time(TTA) - time(plain) = {extra:.2f} s; (views - 1) x forward = {(views - 1) * best['forward']:.2f} s; "
          f"ratio {extra / ((views - 1) * best['forward']):.3f} (goal: <= 1.05, i.e. extra <= {allowed:.2f} s): "
          f"{'met' if extra <= allowed else 'NOT met'}")
    med_extra = median["tta"] - median["plain"]
    print(f"on the medians of the rounds: plain {median['plain']:.2f} s, TTA {median['tta']:.2f} s, "
          f"one pass per view {median['tta_per_view']:.2f} s, forward {median['forward']:.2f} s; "
          f"ratio {med_extra / ((views - 1) * median['forward']):.3f}")


if __name__ == "__main__":
    main()
