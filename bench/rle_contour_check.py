"""Check the RLE decoder on real Severstal images that have their labels drawn in as contours.

    python bench/rle_contour_check.py --images DIR --csv train.csv

Some public copies of Severstal images carry the ground-truth outlines as coloured lines
(pixels where R, G and B differ by more than 40; elsewhere R == G == B). A correct decoder
(1-indexed, column-major) puts the edges of the decoded masks on those lines; a row-major
decoder does not. Prints, per image, the median distance in pixels from mask edges to the
nearest drawn contour pixel for our decoder and for a row-major one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steel_seg.data.kaggle import label_map, read_train_csv  # noqa: E402
from steel_seg.data.rle import rle_decode  # noqa: E402


def edges(mask: np.ndarray) -> np.ndarray:
    mask = mask.astype(np.uint8)
    return np.argwhere(mask.astype(bool) ^ cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--csv", required=True, type=Path)
    args = parser.parse_args()
    for image_id, runs in sorted(read_train_csv(args.csv).items()):
        path = args.images / image_id
        if not runs or not path.is_file():
            continue
        image = cv2.imread(str(path)).astype(int)
        contour = np.argwhere((np.abs(image[..., 0] - image[..., 1]) > 40) | (np.abs(image[..., 1] - image[..., 2]) > 40))
        tree = cKDTree(contour)
        ours = label_map(runs, image.shape[:2]) > 0
        height, width = image.shape[:2]
        row_major = np.zeros_like(ours)
        for run in runs.values():  # same runs, pixels numbered left to right instead
            row_major |= rle_decode(run.rle, (width, height)).reshape(-1, order="F").reshape(height, width)
        d_ours = np.median(tree.query(edges(ours))[0])
        d_rows = np.median(tree.query(edges(row_major))[0])
        print(f"{image_id}  classes {sorted(runs)}  median edge-to-contour: ours {d_ours:.1f} px, row-major {d_rows:.1f} px")


if __name__ == "__main__":
    main()
