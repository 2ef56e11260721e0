"""What the pixel values of label files mean: remapping them, and recognising masks stored wrong.

Many defect data sets store masks as 0 (good) / 255 (defect), often anti-aliased at the edges
(values 1-254). In the PaddleX convention 255 means *ignore*, so such a set read as is trains
with every defect pixel ignored, and its edge values look like unknown class ids. `check`
recognises both patterns (`diagnose_label_values`); `data.label_map` and `data.mask_threshold`
make them trainable without rewriting the files (`LabelMapping`, applied when the cache is built).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255


@dataclass(frozen=True)
class LabelMapping:
    """`threshold` first (values >= it become class 1, the rest 0), then `mapping` (value -> id)."""

    mapping: tuple[tuple[int, int], ...] = ()
    threshold: int | None = None

    @classmethod
    def from_config(cls, data) -> "LabelMapping":
        """From a DataConfig's `label_map` and `mask_threshold`."""
        return cls(tuple(sorted((int(k), int(v)) for k, v in (data.label_map or {}).items())), data.mask_threshold)

    def __bool__(self) -> bool:
        return bool(self.mapping) or self.threshold is not None

    def key(self) -> str:
        """A stable text for cache keys: a different mapping is a different cache."""
        if not self:
            return "raw"
        pairs = ",".join(f"{k}:{v}" for k, v in self.mapping)
        return f"threshold={self.threshold}|map={pairs}"

    def apply(self, label: np.ndarray) -> np.ndarray:
        """The remapped (H, W) uint8 label; the input is returned untouched when nothing is set."""
        if not self:
            return label
        out = label
        if self.threshold is not None:
            out = (label >= self.threshold).astype(np.uint8)
        if self.mapping:
            table = np.arange(256, dtype=np.uint8)
            for source, target in self.mapping:
                table[source] = target
            out = table[out]
        return out


@dataclass(frozen=True)
class ValueDiagnosis:
    pattern: str  # "binary_0_255" | "soft_0_255" | "unknown_ids"
    message: str


def diagnose_label_values(counts: np.ndarray, num_classes: int) -> ValueDiagnosis | None:
    """What a histogram of label values (256 bins, over all label files) says is wrong, if anything.

    Only ids 0..num_classes-1 and 255 (ignore) are valid. 0 and 255 alone, or 0 and 255 with a
    spread of values in between, are binary masks stored for viewing, not class-id maps.
    """
    counts = np.asarray(counts, dtype=np.int64)
    present = {int(v) for v in np.flatnonzero(counts)}
    unknown = sorted(v for v in present if num_classes <= v < IGNORE)
    total = int(counts.sum()) or 1
    defect_ids = {v for v in present if 0 < v < num_classes}
    if IGNORE in present and not defect_ids and not unknown:
        share = counts[IGNORE] / total
        return ValueDiagnosis(
            "binary_0_255",
            f"the masks hold only 0 and 255 ({share:.1%} of pixels are 255): binary masks stored as 0 = good, "
            "255 = defect. In the PaddleX convention 255 means *ignore*, so every defect pixel would be ignored "
            "and the model would learn background only. Fix without rewriting the files: set "
            "`data.label_map: {255: 1}` (labels.txt: background and one defect class).",
        )
    if IGNORE in present and unknown:
        soft = int(sum(counts[v] for v in unknown))
        return ValueDiagnosis(
            "soft_0_255",
            f"the masks hold 0, 255 and {len(unknown)} values in between ({soft / total:.2%} of pixels, "
            f"e.g. {', '.join(map(str, unknown[:5]))}): binary 0/255 masks with soft (anti-aliased) edges, not "
            "class ids. Fix without rewriting the files: set `data.mask_threshold: 128` (values >= 128 become "
            "class 1, the rest background).",
        )
    if unknown:
        return ValueDiagnosis(
            "unknown_ids",
            f"the labels hold class id(s) {_ranges(unknown)} but labels.txt lists {num_classes} classes "
            f"(ids 0..{num_classes - 1}; 255 = ignore): add the missing class names to labels.txt, or map the "
            "values with `data.label_map: {VALUE: ID}`.",
        )
    return None


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (at most a few groups)."""
    groups: list[list[int]] = []
    for v in values:
        if groups and v == groups[-1][-1] + 1:
            groups[-1].append(v)
        else:
            groups.append([v])
    parts = [f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups]
    return ", ".join(parts[:6]) + (f" and {len(parts) - 6} more" if len(parts) > 6 else "")
