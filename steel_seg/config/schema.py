"""The experiment schema: every key a config may hold, its type, range and default.

Validation happens before any work starts. Sections forbid unknown keys so that a typo is an
error with a suggestion instead of a silently ignored setting. Only `model` accepts extra keys:
they are keyword arguments of the PaddleSeg class and are checked against its signature when
the model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# PaddleX's `use_mixed_loss=True`.
PADDLEX_MIXED_LOSS: tuple[tuple[str, float], ...] = (
    ("CrossEntropyLoss", 0.8),
    ("LovaszSoftmaxLoss", 0.2),
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SplitConfig(Section):
    """Train/val/test split of the images with defects (defect-free images are held apart)."""

    ratios: tuple[float, float, float] = (0.7, 0.2, 0.1)
    seed: int = 0

    @field_validator("ratios")
    @classmethod
    def _ratios_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in value) or abs(sum(value) - 1.0) > 1e-6 or value[0] == 0:
            raise ValueError(f"ratios must be >= 0, train > 0, and sum to 1, got {list(value)}")
        return value


class DemoConfig(Section):
    """The synthetic data set used when no real data is configured."""

    num_images: int = Field(240, ge=10)
    seed: int = 0
    class_mix: Literal["moderate", "severstal"] = "moderate"
    """Which classes the images get: `severstal` as in the real set (class 2 in ~5% of images
    with defects), `moderate` the same order but every class common enough to be learned in
    the demo's few minutes of CPU training."""
    defect_free_fraction: float = Field(0.3, ge=0.0, le=1.0)
    """Share of images without defects. Below Severstal's ~47% so that more of the demo's
    images train (defect-free ones only do with data.include_defect_free)."""


class DataConfig(Section):
    root: Path | None = None
    """Kaggle folder (train.csv + train_images/) or PaddleX SEG folder. None: the demo data."""
    format: Literal["auto", "kaggle", "paddlex"] = "auto"
    fallback_to_demo: bool = True
    """When `root` does not exist: use the demo data (and say so) instead of failing."""
    work_dir: Path = Path(".steel_seg")
    """Where converted layouts, split lists and the preprocessing cache are written."""
    size: tuple[int, int] = (400, 64)
    """Training and evaluation size as (width, height), like PaddleX's Resize."""
    split: SplitConfig = SplitConfig()
    include_defect_free: bool = False
    on_bad_sample: Literal["error", "skip"] = "error"
    label_map: dict[int, int] = {}
    """Label values to class ids, e.g. {255: 1} for binary masks stored as 0/255 (255 is 'ignore'
    otherwise); applied when the cache is built, after `mask_threshold`."""
    mask_threshold: int | None = Field(None, ge=1, le=255)
    """For 0/255 masks with soft edges: values >= this become class 1, the rest background."""
    cache: bool = True
    demo: DemoConfig = DemoConfig()

    @field_validator("label_map")
    @classmethod
    def _byte_values(cls, value: dict[int, int]) -> dict[int, int]:
        bad = {k: v for k, v in value.items() if not (0 <= k <= 255 and 0 <= v <= 255)}
        if bad:
            raise ValueError(f"label values and class ids are 0..255, got {bad}")
        return value

    @field_validator("size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 8:
            raise ValueError(f"size is (width, height) and both must be >= 8, got {list(value)}")
        return value


class ModelConfig(BaseModel):
    """A PaddleSeg model by registered name; extra keys are the class's keyword arguments."""

    model_config = ConfigDict(extra="allow")

    type: str = "UNet"
    backbone: dict[str, Any] | None = None
    pretrained: str | None = None
    """Local path (or URL) of backbone or full-model weights (.pdparams)."""

    @field_validator("backbone")
    @classmethod
    def _backbone_has_type(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and "type" not in value:
            raise ValueError("backbone needs a `type`, e.g. {type: ResNet50_vd}")
        return value

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the model class other than type/backbone/pretrained."""
        return dict(self.model_extra or {})


LossTermSpec = tuple[str, float]


class LossConfig(Section):
    use_mixed_loss: Union[bool, list[LossTermSpec]] = False
    """PaddleX vocabulary: true = CE 0.8 + Lovasz 0.2; or [[name, weight], ...]."""
    class_weights: list[float] | None = None
    """Per-class weights for CrossEntropyLoss (background first)."""
    aux_weights: list[float] | None = None
    """Coefficients of extra model outputs (FastSCNN's auxiliary head: 0.4, as PaddleX)."""

    @field_validator("use_mixed_loss")
    @classmethod
    def _weights_positive(cls, value: bool | list[LossTermSpec]) -> bool | list[LossTermSpec]:
        if isinstance(value, list):
            if not value:
                raise ValueError("use_mixed_loss list is empty; give [[name, weight], ...]")
            for name, weight in value:
                if not weight > 0:
                    raise ValueError(f"weight of {name} must be > 0, got {weight}")
        return value

    def terms(self) -> list[LossTermSpec]:
        """The loss as (name, weight) terms."""
        if self.use_mixed_loss is True:
            return list(PADDLEX_MIXED_LOSS)
        if self.use_mixed_loss is False:
            return [("CrossEntropyLoss", 1.0)]
        return [(name, float(weight)) for name, weight in self.use_mixed_loss]


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(4e-5, ge=0)
    lr_power: float = Field(0.9, gt=0)
    """Polynomial decay power; the rate decays to `end_lr` over all steps."""
    end_lr: float = Field(0.0, ge=0)
    eval_interval: int = Field(1, ge=1)
    """Evaluate on the validation split every N epochs (and after the last)."""
    seed: int = 0
    device: Literal["auto", "cpu", "gpu"] = "auto"
    amp: bool = False
    """Mixed precision (GPU only; ignored with a warning on CPU)."""
    sync_bn: bool = False
    """Data-parallel jobs: BatchNorm statistics over the global batch (SyncBatchNorm; GPU only,
    Paddle has no CPU kernel for it). `batch_size` is always the global batch, split over ranks."""
    num_workers: int = Field(0, ge=0)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    """Cap on steps per epoch, for smoke runs; None = the whole training split."""
    output_dir: Path = Path("outputs")


class EvalConfig(Section):
    split: Literal["val", "test"] = "val"
    tta: list[str] = []
    """Test-time augmentation views besides the original, e.g. [hflip], [blur:3], [hflip+blur]
    (views compose with `+`; see steel_seg.deploy.tta for the names); [] = none."""
    tta_merge: Literal["mean", "weighted", "logits_mean", "gmean", "max"] = "mean"
    """How the views' outputs are merged (probabilities; logits for logits_mean); argmax last."""
    tta_weights: list[float] | None = None
    """With tta_merge: weighted, one weight per view, the original first: the seed's
    `0.5 * original + 0.5 * augmented` is [0.5, 0.5]."""
    tta_batched: bool = True
    """Run the views of a batch as one forward pass (one pass per view if memory runs out)."""
    num_overlays: int = Field(4, ge=0)
    batch_size: int | None = Field(None, ge=1)


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = None
    """Tracking URI; default MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working dir."""
    experiment: str = "steel_seg"
    run_name: str | None = None
    tags: dict[str, str] = {}
    log_model: bool = True


class ExperimentConfig(Section):
    """One experiment: data, model, loss, augmentation, training, evaluation, tracking."""

    name: str | None = None
    """Short name of the experiment; defaults to the config file's stem."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    augment: Union[str, list[dict[str, Any]]] = "flip"
    """A named augmentation set (none, flip, flip_distort_crop) or a list of transforms."""
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    demo_profile: dict[str, Any] | None = {}
    """Overrides applied only when the run falls back to the demo data (e.g. fewer epochs),
    so a quick demo never changes the settings used on real data. `null` turns it off (an
    empty mapping would merge into the base file's profile and change nothing)."""

    @model_validator(mode="before")
    @classmethod
    def _paddlex_model_loss(cls, values: Any) -> Any:
        """PaddleX sets the loss on the model (`UNet(use_mixed_loss=True)`): accept that too."""
        if isinstance(values, dict) and isinstance(values.get("model"), dict):
            model = values["model"]
            if "use_mixed_loss" in model:
                values = dict(values)
                values["model"] = {k: v for k, v in model.items() if k != "use_mixed_loss"}
                loss = dict(values.get("loss") or {})
                loss.setdefault("use_mixed_loss", model["use_mixed_loss"])
                values["loss"] = loss
        return values
