"""Reading one epoch from the preprocessing cache vs decoding and resizing the JPEGs.

    python bench/cache_speed.py [--num-images 200] [--size 400 64] [--repeats 3]

Both readers produce the same (image, label) pairs at the training size; the script checks
that, then prints each one's best-of-N time for a full pass and the ratio (measured in one
run, so machine load affects both alike).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steel_seg.config.schema import DataConfig  # noqa: E402
from steel_seg.data.images import read_sample, resize_pair  # noqa: E402
from steel_seg.data.prepare import prepare_data  # noqa: E402
from steel_seg.data.synthetic import generate_dataset  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--size", type=int, nargs=2, default=[400, 64], metavar=("W", "H"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_dataset(Path(tmp) / "kaggle", num_images=args.num_images, seed=0)
        data = prepare_data(DataConfig(root=root, work_dir=Path(tmp) / "work", size=tuple(args.size)), progress=False)
        samples = data.seg.all_samples()
        cache = data.cache

        def from_jpeg():
            for sample in samples:
                resize_pair(*read_sample(sample), tuple(args.size))

        def from_cache():
            for sample in samples:
                image, label = cache.pair(cache.index_of(sample))
                np.array(image), np.array(label)  # touch the pixels, as batching does

        for sample in samples[:5]:  # same pixels either way
            a = resize_pair(*read_sample(sample), tuple(args.size))
            b = cache.pair(cache.index_of(sample))
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])

        jpeg = best_of(args.repeats, from_jpeg)
        cached = best_of(args.repeats, from_cache)
    n = len(samples)
    print(f"images: {n} at 1600x256 -> {args.size[0]}x{args.size[1]}")
    print(f"decode+resize JPEG/PNG: {jpeg:.3f} s/epoch ({1000 * jpeg / n:.2f} ms/image)")
    print(f"resized cache:          {cached:.4f} s/epoch ({1000 * cached / n:.3f} ms/image)")
    print(f"speed-up: {jpeg / cached:.1f}x (goal: >= 10x)")


if __name__ == "__main__":
    main()
