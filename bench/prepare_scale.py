"""Data preparation at Severstal scale: does it stay linear in time and flat in memory?

    python bench/prepare_scale.py [--sizes 1000 2000 4000] [--cache-size 400 64] [--work DIR]

Generates the largest set once (synthetic 1600x256 images in the Kaggle layout), takes the
smaller sets as its first N images (hard links plus their train.csv rows), and times each
step on each set in a fresh child process:

- convert: Kaggle folder -> SEG layout (label PNGs decoded from the RLE, stratified split);
- check:   `python -m steel_seg.data check` on the converted folder (reads every file);
- cache:   the resized training cache at --cache-size (memory-mapped .npy files).

Peak memory is reported two ways, both read in the child: `VmHWM` (the kernel's high-water
mark of resident memory, which also counts the cache's file-backed pages while they are
dirty and is reclaimable) and the peak of `RssAnon` sampled every 5 ms (the heap: what the
step really holds). Flat means the 4k peak is about the 1k peak; linear means seconds per
image stays put. The last lines extrapolate to the real set's 12,568 images.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEVERSTAL_IMAGES = 12_568
STEPS = ("convert", "check", "cache")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak:
    """Samples this process's RssAnon in a thread: the kernel keeps no high-water mark of it."""

    def __init__(self, interval: float = 0.005):
        self.peak, self._stop, self._interval = 0, threading.Event(), interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon"))
            time.sleep(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon"))


def _run_step(step: str, kaggle_dir: str, seg_dir: str, cache_dir: str, cache_size, queue) -> None:
    """One step in a fresh interpreter, so its memory figures are its own."""
    from steel_seg.data.check import check_dataset
    from steel_seg.data.paddlex_layout import open_seg_dataset
    from steel_seg.data.prepare import convert_kaggle
    from steel_seg.data.cache import build_cache

    start_anon = _status_kib("RssAnon")
    with AnonPeak() as anon:
        start = time.perf_counter()
        if step == "convert":
            convert_kaggle(Path(kaggle_dir), Path(seg_dir), progress=False)
        elif step == "check":
            check_dataset(seg_dir, progress=False)
        else:
            seg = open_seg_dataset(seg_dir)
            build_cache(seg.all_samples(), tuple(cache_size), Path(cache_dir), progress=False)
        seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "hwm_mib": _status_kib("VmHWM") / 1024,
               "anon_mib": anon.peak / 1024, "anon_start_mib": start_anon / 1024})


def measure(step: str, kaggle_dir: Path, seg_dir: Path, cache_dir: Path, cache_size) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_run_step, args=(step, str(kaggle_dir), str(seg_dir), str(cache_dir), cache_size, queue))
    child.start()
    result = queue.get()
    child.join()
    if child.exitcode:
        raise SystemExit(f"{step} on {kaggle_dir} failed (exit code {child.exitcode})")
    return result


def subset(full: Path, out: Path, count: int) -> Path:
    """The first `count` images of `full` as their own Kaggle folder (hard links, own CSV)."""
    if (out / "train.csv").is_file():
        return out
    images = sorted((full / "train_images").iterdir())[:count]
    keep = {p.name for p in images}
    (out / "train_images").mkdir(parents=True)
    for path in images:
        os.link(path, out / "train_images" / path.name)
    with (full / "train.csv").open(newline="") as src, (out / "train.csv").open("w", newline="") as dst:
        reader, writer = csv.reader(src), csv.writer(dst)
        writer.writerow(next(reader))
        writer.writerows(row for row in reader if row[0] in keep)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--cache-size", type=int, nargs=2, default=[400, 64], metavar=("W", "H"))
    parser.add_argument("--work", type=Path, default=Path("bench_work/prepare_scale"),
                        help="where the generated sets live (reused by later runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from steel_seg.data.synthetic import GENERATOR_VERSION, generate_dataset

    sizes = sorted(args.sizes)
    full = args.work / f"kaggle_v{GENERATOR_VERSION}_seed{args.seed}_n{sizes[-1]}"
    if not (full / "train.csv").is_file():
        print(f"generating {sizes[-1]} synthetic 1600x256 images in {full} (once; reused later)", flush=True)
        start = time.perf_counter()
        generate_dataset(full, num_images=sizes[-1], seed=args.seed, progress=True, overwrite=True)
        print(f"generated in {time.perf_counter() - start:.0f} s", flush=True)

    rows = []
    for count in sizes:
        kaggle_dir = full if count == sizes[-1] else subset(full, args.work / f"subset_n{count}", count)
        seg_dir, cache_dir = args.work / f"seg_n{count}", args.work / f"cache_n{count}"
        shutil.rmtree(seg_dir, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
        for step in STEPS:
            result = measure(step, kaggle_dir, seg_dir, cache_dir, args.cache_size)
            rows.append((count, step, result))
            print(f"  {count:>5} images  {step:<8} {result['seconds']:7.1f} s  "
                  f"{1000 * result['seconds'] / count:6.2f} ms/img  peak RssAnon {result['anon_mib']:6.1f} MiB  "
                  f"VmHWM {result['hwm_mib']:6.1f} MiB", flush=True)

    small, large = sizes[0], sizes[-1]
    print()
    print(f"| step | images | seconds | ms / image | peak heap (RssAnon) MiB | VmHWM MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for count, step, r in rows:
        print(f"| {step} | {count} | {r['seconds']:.1f} | {1000 * r['seconds'] / count:.2f} | {r['anon_mib']:.1f} | {r['hwm_mib']:.1f} |")
    print()
    print(f"Growth from {small} to {large} images (x{large / small:g} the data):")
    for step in STEPS:
        first = next(r for c, s, r in rows if c == small and s == step)
        last = next(r for c, s, r in rows if c == large and s == step)
        time_ratio = last["seconds"] / first["seconds"]
        per_image = last["seconds"] / large
        # What growth there is (the CSV's RLE text, file lists) is per image: extend it linearly.
        heap_per_image = (last["anon_mib"] - first["anon_mib"]) / (large - small)
        heap_full = last["anon_mib"] + heap_per_image * (SEVERSTAL_IMAGES - large)
        print(f"  {step:<8} time x{time_ratio:.2f} (linear: x{large / small:g}), peak heap x{last['anon_mib'] / first['anon_mib']:.2f} "
              f"(flat: x1; {1024 * heap_per_image:.1f} KiB more per image), VmHWM x{last['hwm_mib'] / first['hwm_mib']:.2f}; "
              f"at {SEVERSTAL_IMAGES:,} images: ~{per_image * SEVERSTAL_IMAGES / 60:.1f} min, heap ~{heap_full:.0f} MiB")


if __name__ == "__main__":
    main()
