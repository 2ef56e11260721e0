"""Models by name from PaddleSeg's own registries, and loading of pretrained weights.

We do not keep a model zoo of our own: `{type: UNet}` or `{type: FCN, backbone: {type:
HRNet_W18}}` is looked up in `paddleseg.cvlibs.manager`, so every PaddleSeg model works.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paddle

log = logging.getLogger(__name__)

# PaddleX's coefficient for auxiliary heads (FastSCNN, OCRNet, ...).
AUX_LOSS_WEIGHT = 0.4


def _registries():
    from paddleseg.cvlibs import manager  # imported late: heavy, and pulls in paddle

    return manager.MODELS, manager.BACKBONES


def _unknown(kind: str, name: str, available: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {kind} `{name}`.{hint} Available: {', '.join(sorted(available))}")


def _check_kwargs(cls: type, kwargs: dict[str, Any], where: str) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # takes **kwargs: nothing to check against
    valid = [n for n in params if n not in ("self", "num_classes", "backbone", "pretrained")]
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ValueError(f"{where}: `{cls.__name__}` has no argument `{key}`; {hint}valid: {', '.join(valid)}")


def check_model_spec(model_type: str, backbone: dict[str, Any] | None, kwargs: dict[str, Any]) -> None:
    """Validate names and keyword arguments without building anything (cheap, for config checks)."""
    models, backbones = _registries()
    if model_type not in models.components_dict:
        raise _unknown("model type", model_type, list(models.components_dict))
    cls = models.components_dict[model_type]
    _check_kwargs(cls, kwargs, "model")
    takes_backbone = "backbone" in inspect.signature(cls.__init__).parameters
    if backbone is None and takes_backbone and inspect.signature(cls.__init__).parameters["backbone"].default is inspect.Parameter.empty:
        raise ValueError(f"model `{model_type}` needs a backbone, e.g. backbone: {{type: ResNet50_vd}}")
    if backbone is not None:
        if not takes_backbone:
            raise ValueError(f"model `{model_type}` takes no backbone; remove model.backbone")
        name = backbone.get("type")
        if name not in backbones.components_dict:
            raise _unknown("backbone type", str(name), list(backbones.components_dict))
        _check_kwargs(backbones.components_dict[name], {k: v for k, v in backbone.items() if k != "type"}, "model.backbone")


def build_model(model_type: str, num_classes: int, backbone: dict[str, Any] | None = None, **kwargs) -> paddle.nn.Layer:
    """Instantiate a registered PaddleSeg model; `num_classes` comes from the data."""
    check_model_spec(model_type, backbone, kwargs)
    models, backbones = _registries()
    if backbone is not None:
        spec = dict(backbone)
        try:
            kwargs["backbone"] = backbones.components_dict[spec.pop("type")](**spec)
        except TypeError as exc:
            raise ValueError(f"model.backbone {backbone}: {exc}") from None
    try:
        return models.components_dict[model_type](num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ValueError(f"model `{model_type}`: {exc}") from None


def output_weights(num_outputs: int, configured: list[float] | None = None) -> list[float]:
    """Loss coefficient per model output: 1 for the main head, 0.4 for each auxiliary head."""
    if configured is None:
        return [1.0] + [AUX_LOSS_WEIGHT] * (num_outputs - 1)
    weights = [1.0] + list(configured)
    if len(weights) != num_outputs:
        raise ValueError(
            f"loss.aux_weights has {len(configured)} value(s) but the model has "
            f"{num_outputs - 1} auxiliary output(s)"
        )
    return weights


@dataclass
class LoadReport:
    """What happened when loading weights: which part, and which keys did not fit."""

    target: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def _fetch(path_or_url: str) -> Path:
    if "://" not in path_or_url:
        path = Path(path_or_url).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained: no such file {path}")
        return path
    cache = Path(os.environ.get("STEEL_SEG_CACHE", Path.home() / ".cache" / "steel_seg")) / "weights"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / Path(path_or_url.split("?")[0]).name
    if not target.exists():
        log.info("downloading %s", path_or_url)
        fd, tmp = tempfile.mkstemp(dir=cache)
        os.close(fd)
        try:
            urllib.request.urlretrieve(path_or_url, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target


def load_pretrained(model: paddle.nn.Layer, path_or_url: str) -> LoadReport:
    """Load full-model or backbone weights into `model`, reporting keys that did not fit.

    Whether the file holds the whole model or only its backbone is decided by which of the two
    state dicts shares more keys with it. Tensors whose shapes differ (e.g. a head trained for
    another number of classes) are skipped and listed, not forced.
    """
    state = paddle.load(str(_fetch(path_or_url)))
    if not isinstance(state, dict):
        raise ValueError(f"model.pretrained {path_or_url}: not a state dict (.pdparams)")
    target, layer = "model", model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, paddle.nn.Layer):
        whole, part = set(model.state_dict()), set(backbone.state_dict())
        if len(part & set(state)) > len(whole & set(state)):
            target, layer = "backbone", backbone
    own = layer.state_dict()
    usable, mismatched = {}, []
    for key, value in state.items():
        if key in own:
            if list(own[key].shape) == list(value.shape):
                usable[key] = value
            else:
                mismatched.append(f"{key}: file {list(value.shape)} vs model {list(own[key].shape)}")
    layer.set_state_dict(usable)
    report = LoadReport(
        target=target,
        loaded=len(usable),
        missing=sorted(set(own) - set(usable) - {m.split(":")[0] for m in mismatched}),
        unexpected=sorted(set(state) - set(own)),
        mismatched=mismatched,
    )
    log.info(
        "loaded %d tensors from %s into the %s; missing %d, unexpected %d, shape mismatches %d",
        report.loaded, path_or_url, target, len(report.missing), len(report.unexpected), len(report.mismatched),
    )
    for kind in ("missing", "unexpected", "mismatched"):
        keys = getattr(report, kind)
        if keys:
            log.warning("%s keys: %s%s", kind, ", ".join(keys[:10]), " ..." if len(keys) > 10 else "")
    return report
