"""Figures for a run: training curves, confusion matrix, prediction overlays (matplotlib, Agg).

Figures are built on matplotlib's Agg canvas directly rather than through pyplot, so making one
never opens a window or changes the backend of the user's session; save with `fig.savefig`.
"""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

IGNORE_INDEX = 255

# One RGB per class id. Class 0 (background) is never painted in overlays; the defect colours
# are the Okabe-Ito palette, which stays distinguishable for colour-blind readers and on the
# grey of steel. Ids past the end reuse the defect colours in order.
CLASS_COLOURS = np.array(
    [
        (0, 0, 0),        # 0 background (transparent in overlays)
        (230, 159, 0),    # 1 orange
        (86, 180, 233),   # 2 sky blue
        (0, 158, 115),    # 3 bluish green
        (204, 121, 167),  # 4 reddish purple
        (240, 228, 66),   # 5 yellow
        (0, 114, 178),    # 6 blue
        (213, 94, 0),     # 7 vermillion
    ],
    dtype=np.uint8,
)
# Ignored pixels are painted solid light grey: a flat patch stands out from textured steel,
# where a translucent grey would vanish into it.
IGNORE_COLOUR = np.array((200, 200, 200), dtype=np.uint8)


def class_colour(class_id: int) -> np.ndarray:
    """RGB (uint8) of a class id; cycles through the defect colours for large ids."""
    if class_id == IGNORE_INDEX:
        return IGNORE_COLOUR
    if class_id < len(CLASS_COLOURS):
        return CLASS_COLOURS[class_id]
    return CLASS_COLOURS[1 + (class_id - 1) % (len(CLASS_COLOURS) - 1)]


def _rgb01(class_id: int) -> tuple[float, float, float]:
    return tuple(class_colour(class_id) / 255.0)


def _new_figure(**kwargs) -> Figure:
    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------------------------------------
# Training curves


def training_curves(history: list[dict], class_names: Sequence[str] | None = None) -> Figure:
    """Train loss (with its terms), learning rate, and val mIoU with per-class IoU, per epoch.

    `history` is the trainer's list of epoch records; validation keys appear only on the epochs
    that were evaluated. Class names come from `class_names`, else `history[0]["class_names"]`.
    """
    fig = _new_figure(figsize=(16, 4.2))
    ax_loss, ax_lr, ax_val = fig.subplots(1, 3)
    epochs = [r["epoch"] for r in history]
    marker = "o" if len(history) <= 30 else None  # single points are invisible without one

    ax_loss.plot(epochs, [_num(r.get("train_loss")) for r in history], marker=marker, color="black", label="total")
    terms = sorted({k for r in history for k in r if k.startswith("loss_")})
    for term in terms:
        ax_loss.plot(epochs, [_num(r.get(term)) for r in history], lw=1, ls="--", label=term[len("loss_"):])
    if terms:
        ax_loss.legend(fontsize="small")
    ax_loss.set(title="train loss", xlabel="epoch", ylabel="loss")

    ax_lr.plot(epochs, [_num(r.get("lr")) for r in history], marker=marker, color="tab:blue")
    ax_lr.set(title="learning rate", xlabel="epoch", ylabel="lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    evaluated = [r for r in history if "val_miou" in r]
    val_epochs = [r["epoch"] for r in evaluated]
    if class_names is None and history:
        class_names = history[0].get("class_names")
    per_class = [list(r.get("val_iou") or []) for r in evaluated]
    num_classes = max((len(v) for v in per_class), default=0)
    for c in range(num_classes):
        name = class_names[c] if class_names is not None and c < len(class_names) else f"class {c}"
        colour = "grey" if c == 0 else _rgb01(c)  # background's black would read as mIoU
        values = [_num(v[c]) if c < len(v) else math.nan for v in per_class]
        ax_val.plot(val_epochs, values, lw=1.2, color=colour, marker=marker, ms=3, label=name)
    ax_val.plot(val_epochs, [_num(r["val_miou"]) for r in evaluated], lw=2.5, color="black", marker=marker, label="mIoU")
    ax_val.set(title="validation IoU", xlabel="epoch", ylabel="IoU", ylim=(0, 1))
    if evaluated:
        ax_val.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))

    for ax in (ax_loss, ax_lr, ax_val):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if not history:
        ax_loss.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax_loss.transAxes)
    return fig


def _num(value) -> float:
    """None (e.g. from JSON) and missing values plot as gaps."""
    return math.nan if value is None else float(value)


# ---------------------------------------------------------------------------------------------
# Confusion matrix


def row_normalised(cm) -> np.ndarray:
    """Each row divided by its total: the share of a true class predicted as each class.

    A class with no pixels in the evaluation set has an all-NaN row (shown blank), not zeros.
    """
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, cm / totals, np.nan)


def confusion_matrix_figure(cm, class_names: Sequence[str]) -> Figure:
    """Rows = true class, columns = predicted; colour = row share (recall on the diagonal).

    Pixel counts span orders of magnitude (background dwarfs the defects), so colouring raw
    counts would show one dark cell; row shares make every class readable.
    """
    cm = np.asarray(cm)
    n = len(class_names)
    if cm.ndim != 2 or cm.shape != (n, n):
        raise ValueError(
            f"confusion matrix has shape {cm.shape} but there are {n} class names "
            f"({', '.join(class_names)}); expected ({n}, {n})"
        )
    shares = row_normalised(cm)
    fig = _new_figure(figsize=(2.6 + 1.25 * n, 1.9 + 1.05 * n))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="whitesmoke")
    image = ax.imshow(np.ma.masked_invalid(shares), cmap=cmap, vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            share = shares[i, j]
            text = _compact_count(cm[i, j]) + ("" if math.isnan(share) else f"\n{_percent(share)}")
            colour = "white" if not math.isnan(share) and share > 0.55 else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    long_names = max(map(len, class_names), default=0) > 6
    ax.set_xticks(range(n), class_names, rotation=30 if long_names else 0, ha="right" if long_names else "center")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title="confusion matrix (pixel counts; colour = share of the true class)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of true class (diagonal = recall)")
    return fig


def _percent(share: float) -> str:
    # A handful of pixels out of millions is not "0.0%": that would hide a real confusion.
    return "<0.1%" if 0 < share < 0.0005 else f"{share:.1%}"


def _compact_count(value) -> str:
    """12345678 -> "12.3M": pixel counts are long and cells are small."""
    value = int(value)
    for threshold, divisor, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / divisor:.3g}{suffix}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# Overlays


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Paint class colours over an image; background stays as is, ignore (255) turns grey."""
    out = _as_rgb_uint8(image).astype(np.float32)
    for class_id in np.unique(mask):
        if class_id == 0:
            continue
        where = mask == class_id
        strength = 1.0 if class_id == IGNORE_INDEX else alpha
        out[where] = (1 - strength) * out[where] + strength * class_colour(int(class_id))
    return out.round().astype(np.uint8)


def overlays_figure(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    class_names: Sequence[str],
    titles: Sequence[str] | None = None,
) -> Figure:
    """Image, ground truth and prediction per sample, with a legend of class colours.

    Wide strips (such as 400x64 steel) are stacked image / truth / prediction under each other
    at full width, so defects line up vertically and stay large enough to see; squarer images
    sit side by side, one sample a row. Either way there are three axes per sample.
    """
    if not (len(images) == len(labels) == len(preds)):
        raise ValueError(f"got {len(images)} images, {len(labels)} labels and {len(preds)} predictions; they must match")
    if not images:
        raise ValueError("no samples to draw: images is empty")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"got {len(titles)} titles for {len(images)} samples")
    for i, (image, label, pred) in enumerate(zip(images, labels, preds)):
        if np.shape(label) != np.shape(image)[:2] or np.shape(pred) != np.shape(image)[:2]:
            raise ValueError(
                f"sample {i}: image is {np.shape(image)[:2]} (HxW) but label is {np.shape(label)} and "
                f"prediction {np.shape(pred)}; resize them to the image size first"
            )

    height, width = np.shape(images[0])[:2]
    wide = width >= 2.5 * height
    n = len(images)
    kinds = ("image", "ground truth", "prediction")
    if wide:
        panel_w = float(np.clip(width / 60, 6, 12))
        panel_h = panel_w * height / width + 0.3
        fig = _new_figure(figsize=(panel_w + 0.8, n * 3 * panel_h + 0.6))
        axes = np.asarray(fig.subplots(3 * n, 1, squeeze=False)).reshape(n, 3)
    else:
        panel_w = 3.6
        panel_h = panel_w * height / width + 0.3
        fig = _new_figure(figsize=(3 * panel_w, n * panel_h + 0.6))
        axes = np.asarray(fig.subplots(n, 3, squeeze=False))

    for i in range(n):
        views = (_as_rgb_uint8(images[i]), overlay(images[i], np.asarray(labels[i])), overlay(images[i], np.asarray(preds[i])))
        for k, (ax, view) in enumerate(zip(axes[i], views)):
            ax.imshow(view, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if wide:
                ax.set_ylabel(kinds[k], fontsize=8)
            elif i == 0:
                ax.set_title(kinds[k])
        name = titles[i] if titles is not None else f"sample {i}"
        if wide:
            axes[i][0].set_title(name, loc="left", fontsize=9, fontweight="bold")
        else:
            axes[i][0].set_ylabel(name, fontsize=9)

    handles = [Patch(color=_rgb01(c), label=name) for c, name in enumerate(class_names) if c != 0]
    if any(np.any(np.asarray(m) == IGNORE_INDEX) for m in (*labels, *preds)):
        handles.append(Patch(color=_rgb01(IGNORE_INDEX), label="ignore (255)"))
    fig.legend(handles=handles, loc="outside upper center", ncol=max(1, len(handles)), frameon=False, fontsize=9)
    return fig


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1 or HxWx3; uint8 or floats in 0..1 / 0..255 -> HxWx3 uint8."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"images must be HxW or HxWx3, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).round().astype(np.uint8)
    return arr


# ---------------------------------------------------------------------------------------------
# Pipeline stages


def stage_bar_chart(
    names: Sequence[str],
    means: Sequence[float],
    stds: Sequence[float],
    *,
    seeds: Sequence[Sequence[float]] | None = None,
    references: Sequence[float | None] | None = None,
    winner: str | None = None,
    resolved: bool = True,
    title: str = "",
    ylabel: str = "mIoU (%)",
) -> Figure:
    """One bar per variant: mean over seeds with ±1 std error bars, each seed as a dot, and the
    seed study's published value as a black diamond where given.

    A NaN mean (every run failed, or none yet) leaves a gap marked "no result". The winner's bar
    is outlined; an unresolved win is said in the title, so the figure is not read as a ranking.
    """
    n = len(names)
    if not (len(means) == len(stds) == n):
        raise ValueError(f"got {n} names, {len(means)} means and {len(stds)} stds; they must match")
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"got {len(seeds)} lists of seed values for {n} variants")
    if references is not None and len(references) != n:
        raise ValueError(f"got {len(references)} reference values for {n} variants")

    fig = _new_figure(figsize=(max(4.5, 1.3 * n + 2.0), 4.2))
    ax = fig.add_subplot()
    x = np.arange(n)
    heights = np.array([_num(m) for m in means])
    errors = np.array([0.0 if math.isnan(_num(s)) else _num(s) for s in stds])
    errors[np.isnan(heights)] = np.nan  # no cap drawn at zero for a variant without results
    colours = [_rgb01(1 + i % (len(CLASS_COLOURS) - 1)) for i in range(n)]
    bars = ax.bar(x, np.nan_to_num(heights), yerr=errors, capsize=5, color=colours, alpha=0.85,
                  edgecolor="black", linewidth=0.6, error_kw={"elinewidth": 1.2}, zorder=2)
    for i, name in enumerate(names):
        if math.isnan(heights[i]):
            bars[i].set_visible(False)
            ax.text(i, 0.5, "no result", ha="center", va="center", fontsize=9, color="dimgrey", transform=ax.get_xaxis_transform())
        elif name == winner:
            bars[i].set_linewidth(2.2)
        if seeds is not None and len(seeds[i]):
            jitter = np.linspace(-0.12, 0.12, len(seeds[i])) if len(seeds[i]) > 1 else [0.0]
            ax.scatter(i + np.asarray(jitter), [_num(v) for v in seeds[i]], s=14, color="black", alpha=0.6, zorder=3,
                       label="single seed" if i == next(k for k, s in enumerate(seeds) if len(s)) else None)
    if references is not None and any(r is not None for r in references):
        ref_x = [i for i, r in enumerate(references) if r is not None]
        ax.scatter(ref_x, [references[i] for i in ref_x], marker="D", s=45, color="black", zorder=4, label="seed study")
    for i in range(n):
        if not math.isnan(heights[i]):
            ax.annotate(f"{heights[i]:.1f}", (i, heights[i] + errors[i]), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
    long_names = max(map(len, names), default=0) > 10
    ax.set_xticks(x, names, rotation=25 if long_names else 0, ha="right" if long_names else "center")
    suffix = "" if winner is None else f" — best: {winner}" + ("" if resolved else " (not resolved)")
    ax.set(ylabel=ylabel, title=f"{title}{suffix}")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    handles, labels = ax.get_legend_handles_labels()
    if handles:  # below the axes: inside, it would hide a bar's error bar or a "no result"
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), frameon=False, fontsize="small")
    return fig


def _line_colour(class_id: int) -> tuple[float, float, float]:
    """Background drawn in grey (its class colour is black)."""
    return (0.45, 0.45, 0.45) if class_id == 0 else _rgb01(class_id)


def sensitivity_figure(table) -> Figure:
    """Per-class F1 and IoU across the quintiles of one feature (a sensitivity.FeatureTable)."""
    fig = _new_figure(figsize=(11, 4.2))
    labels = [f"Q{b.index + 1}\n{b.low:.3g}-{b.high:.3g}\n({b.images} img)" for b in table.bins]
    x = np.arange(len(table.bins))
    for panel, (key, stds, title) in enumerate((("f1", table.f1_std, "F1"), ("iou", table.iou_std, "IoU"))):
        ax = fig.add_subplot(1, 2, panel + 1)
        for c, name in enumerate(table.class_names):
            values = [getattr(b, key)[c] for b in table.bins]
            std = stds[c]
            label = f"{name} (std {std:.3f})" if not math.isnan(std) else name
            ax.plot(x, values, marker="o", color=_line_colour(c), label=label, linestyle="--" if c == 0 else "-")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(title)
        ax.set_title(f"{title} by {table.feature.replace('_', ' ')} quintile")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return fig


def tta_comparison_figure(class_names: Sequence[str], arms: Sequence[tuple[str, dict, float]], split: str) -> Figure:
    """Per-class IoU and recall of each arm (label, scores, ms/image) side by side, cost in the legend."""
    fig = _new_figure(figsize=(11, 4.2))
    x = np.arange(len(class_names))
    width = 0.8 / max(len(arms), 1)
    for panel, (key, title) in enumerate((("iou", "IoU"), ("recall", "recall"))):
        ax = fig.add_subplot(1, 2, panel + 1)
        for k, (label, scores, ms) in enumerate(arms):
            values = [_num(v) for v in scores[key]]
            ax.bar(x + (k - (len(arms) - 1) / 2) * width, values, width, label=f"{label} ({ms:.0f} ms/img)")
        ax.set_xticks(x, list(class_names), fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"per-class {title} on {split}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return fig
