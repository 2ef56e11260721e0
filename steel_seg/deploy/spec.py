"""`deploy.yaml`: the one description of an export folder, read by every consumer.

The Predictor, the pyfunc wrapper and the predict CLI all build preprocessing and
post-processing from it, so none of them can disagree about sizes, normalisation or thresholds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

SPEC_FILE = "deploy.yaml"
FORMAT_VERSION = 1

# Preference when several backends pass their check and none was measured: the fastest on
# CPU in our measurements first (docs/PERFORMANCE.md: OpenVINO < oneDNN < ONNX Runtime << plain).
CPU_BACKENDS = ("openvino", "onednn", "onnxruntime", "paddle")
GPU_BACKENDS = ("tensorrt", "gpu")
ALL_BACKENDS = CPU_BACKENDS + GPU_BACKENDS


class SpecError(ValueError):
    """deploy.yaml is missing, malformed or inconsistent with the folder."""


@dataclass
class Preprocess:
    size: tuple[int, int]
    """Model input as (width, height); images are resized to it bilinearly."""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"


@dataclass
class Postprocess:
    thresholds: list[float]
    """Per class (background first, ignored): a pixel whose argmax class has a lower
    probability than this becomes background."""
    min_areas: list[int]
    """Per class, in pixels at the original resolution: smaller components become background."""
    tuned: dict[str, Any] | None = None


@dataclass
class BackendCheck:
    max_rel_diff: float
    argmax_agreement: float
    ms_per_image: float | None = None


@dataclass
class DeploySpec:
    classes: list[str]
    preprocess: Preprocess
    postprocess: Postprocess
    model: dict[str, Any]
    """arch, backbone, and the files: program, params, onnx."""
    backends: dict[str, BackendCheck] = field(default_factory=dict)
    """Backends that passed the check against the training-time model."""
    rejected: dict[str, str] = field(default_factory=dict)
    """Backends that were tried and are not offered, with the reason."""
    default_backend: str | None = None
    tta: dict[str, Any] = field(default_factory=lambda: {"views": [], "merge": "mean"})
    source: dict[str, Any] = field(default_factory=dict)
    """Where the model came from: run id, experiment, metrics, versions."""
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocess"]["size"] = list(self.preprocess.size)
        data["preprocess"]["mean"] = list(self.preprocess.mean)
        data["preprocess"]["std"] = list(self.preprocess.std)
        return data

    def write(self, folder: Path) -> Path:
        path = Path(folder) / SPEC_FILE
        header = "# steel_seg export: how to preprocess, run and post-process this model.\n"
        path.write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False, width=100, default_flow_style=None))
        return path


def _need(data: dict, key: str, where: str):
    if key not in data:
        raise SpecError(f"{where}: missing key `{key}`")
    return data[key]


def spec_from_dict(data: dict, where: str = SPEC_FILE) -> DeploySpec:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    version = data.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise SpecError(f"{where}: format_version {version} is newer than this steel_seg ({FORMAT_VERSION}); upgrade steel_seg")
    classes = list(_need(data, "classes", where))
    pre = dict(_need(data, "preprocess", where))
    post = dict(_need(data, "postprocess", where))
    spec = DeploySpec(
        classes=classes,
        preprocess=Preprocess(
            size=tuple(_need(pre, "size", f"{where} preprocess")),
            mean=tuple(pre.get("mean", (0.5, 0.5, 0.5))),
            std=tuple(pre.get("std", (0.5, 0.5, 0.5))),
            channel_order=pre.get("channel_order", "RGB"),
        ),
        postprocess=Postprocess(
            thresholds=[float(t) for t in post.get("thresholds") or [0.0] * len(classes)],
            min_areas=[int(a) for a in post.get("min_areas") or [0] * len(classes)],
            tuned=post.get("tuned"),
        ),
        model=dict(_need(data, "model", where)),
        backends={k: BackendCheck(**v) for k, v in (data.get("backends") or {}).items()},
        rejected=dict(data.get("rejected") or {}),
        default_backend=data.get("default_backend"),
        tta=dict(data.get("tta") or {"views": [], "merge": "mean"}),
        source=dict(data.get("source") or {}),
        format_version=version,
    )
    for name, values in (("thresholds", spec.postprocess.thresholds), ("min_areas", spec.postprocess.min_areas)):
        if len(values) != len(classes):
            raise SpecError(f"{where}: postprocess.{name} has {len(values)} values for {len(classes)} classes")
    if len(spec.preprocess.size) != 2:
        raise SpecError(f"{where}: preprocess.size must be [width, height], got {list(spec.preprocess.size)}")
    unknown = [b for b in spec.backends if b not in ALL_BACKENDS]
    if unknown:
        raise SpecError(f"{where}: unknown backend(s) {unknown}; known: {', '.join(ALL_BACKENDS)}")
    return spec


def read_spec(folder: str | Path) -> DeploySpec:
    """The DeploySpec of an export folder; errors name the folder and what is missing."""
    folder = Path(folder)
    path = folder / SPEC_FILE
    if not path.is_file():
        hint = " (it is a file; pass the export folder)" if folder.is_file() else ""
        raise SpecError(f"{folder} is not an export folder: no {SPEC_FILE}{hint}. Make one with `python -m steel_seg.export`.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from None
    return spec_from_dict(data, str(path))


def set_tta(folder: str | Path, views: list[str], merge: str = "mean", weights: list[float] | None = None,
            chosen: dict[str, Any] | None = None) -> DeploySpec:
    """Write TTA views, merge and weights into an export's deploy.yaml, checked before writing.

    `chosen` records where the choice came from (run, split, gain), shown beside it.
    """
    from steel_seg.deploy.tta import resolve

    spec = read_spec(folder)
    try:
        plan = resolve(views, merge, weights)
    except ValueError as exc:
        raise SpecError(f"{Path(folder) / SPEC_FILE}: {exc}") from None
    spec.tta = {**plan.as_spec(), **({"chosen": chosen} if chosen else {})}
    spec.write(Path(folder))
    return spec
