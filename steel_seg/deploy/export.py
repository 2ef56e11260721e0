"""Export a trained model into a self-contained folder and check every backend against it.

The folder holds the legacy inference program and weights (`model.pdmodel`, `model.pdiparams`),
optionally `model.onnx`, `deploy.yaml`, the training config it came from and a README. Every
backend is compared with the training-time (dygraph) model on sample images; one that differs
by more than MAX_REL_DIFF of the logits' magnitude, or whose argmax agrees on fewer than
MIN_AGREEMENT of the pixels, is not offered.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from steel_seg.deploy.backends import BackendUnavailable, backends_for_this_machine, open_engine
from steel_seg.deploy.preprocess import model_input
from steel_seg.deploy.program import save_program
from steel_seg.deploy.spec import CPU_BACKENDS, GPU_BACKENDS, BackendCheck, DeploySpec, Postprocess, Preprocess

log = logging.getLogger(__name__)

MAX_REL_DIFF = 1e-4
MIN_AGREEMENT = 0.999


class ExportError(RuntimeError):
    """The export cannot be written (nothing is left behind); the message says why."""


@dataclass
class ModelSource:
    """What to export: the model's build spec, its weights and what it was trained for."""

    model_type: str
    backbone: dict | None
    kwargs: dict
    class_names: list[str]
    input_size: tuple[int, int]
    weights: Path
    tta_views: list[str] = field(default_factory=list)
    tta_merge: str = "mean"
    tta_weights: list[float] | None = None
    config_yaml: str | None = None
    provenance: dict = field(default_factory=dict)

    def program_spec(self) -> dict:
        return {
            "type": self.model_type, "backbone": self.backbone, "kwargs": self.kwargs,
            "num_classes": len(self.class_names), "input_size": list(self.input_size),
        }


def compare_logits(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(max |difference| relative to max |reference|, share of pixels whose argmax agrees).

    Relative, because logit scales differ by many orders of magnitude between architectures.
    """
    scale = float(np.abs(reference).max())
    rel = float(np.abs(other.astype(np.float64) - reference).max() / scale) if scale > 0 else float("inf")
    agreement = float((other.argmax(axis=1) == reference.argmax(axis=1)).mean())
    return rel, agreement


def reference_logits(source: ModelSource, batch: np.ndarray) -> np.ndarray:
    """Logits of the training-time model in eval mode (dygraph), the yardstick of every backend."""
    import paddle

    from steel_seg.checkpoint import load_weights
    from steel_seg.models import build_model
    from steel_seg.tta import main_logits

    model = build_model(source.model_type, len(source.class_names), source.backbone, **source.kwargs)
    load_weights(model, source.weights)
    model.eval()
    with paddle.no_grad():
        return main_logits(model(paddle.to_tensor(batch))).numpy()


def engines_ms(engines: dict, batch: np.ndarray, rounds: int = 3) -> dict[str, float]:
    """Median ms per image of each engine alone at batch 1, timed interleaved (every engine runs
    image i before any runs image i + 1), so a change in machine load hits all of them alike."""
    for engine in engines.values():
        engine.run(batch[:1])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for i in range(len(batch)):
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.run(batch[i:i + 1])
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(t)) for name, t in times.items()}


# Backends within this margin of the fastest count as equally fast; the earlier one in the
# preference order (spec.CPU_BACKENDS / GPU_BACKENDS) is the default then, so that timing noise
# at export does not flip the choice between near-equal engines.
TIE_MARGIN = 1.10


def pick_default(passed: dict[str, BackendCheck]) -> str:
    fastest = min(c.ms_per_image for c in passed.values())
    order = [*GPU_BACKENDS, *CPU_BACKENDS]
    near = [b for b, c in passed.items() if c.ms_per_image <= fastest * TIE_MARGIN]
    return min(near, key=lambda b: order.index(b) if b in order else len(order))


def check_backends(
    folder: Path, reference: np.ndarray, batch: np.ndarray, candidates: list[str], threads: int | None = None
) -> tuple[dict[str, BackendCheck], dict[str, str]]:
    """Run each candidate backend on `batch` and keep those that match `reference`."""
    passed: dict[str, tuple[float, float]] = {}
    engines: dict = {}
    rejected: dict[str, str] = {}
    for name in candidates:
        try:
            engine = open_engine(folder, name, threads)
            logits = engine.run(batch)
        except BackendUnavailable as exc:
            rejected[name] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - an engine that fails here is reported, not fatal
            rejected[name] = f"failed to run: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            continue
        if logits.shape != reference.shape:
            rejected[name] = f"output shape {list(logits.shape)} differs from the model's {list(reference.shape)}"
            continue
        rel, agreement = compare_logits(reference, logits)
        if not (rel <= MAX_REL_DIFF and agreement >= MIN_AGREEMENT):
            rejected[name] = f"differs from the training-time model: relative logit difference {rel:.2e}, argmax agreement {agreement:.4%}"
            continue
        passed[name], engines[name] = (rel, agreement), engine
    timing = engines_ms(engines, batch) if engines else {}
    return {
        name: BackendCheck(max_rel_diff=rel, argmax_agreement=agreement, ms_per_image=round(timing[name], 3))
        for name, (rel, agreement) in passed.items()
    }, rejected


def _fresh_folder(out: Path, force: bool) -> Path:
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; choose another --out or pass --force to replace it")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished folder into place; an old export is removed only after that."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def export_model(
    source: ModelSource,
    out: Path,
    samples: list[np.ndarray],
    *,
    onnx: bool = False,
    force: bool = False,
    threads: int | None = None,
) -> DeploySpec:
    """Write the export folder `out` for `source`, checked on `samples` (RGB images, any size).

    Nothing is left at `out` if any step fails; an existing folder is replaced only with `force`.
    """
    if not samples:
        raise ExportError("no sample images to check the export on")
    out = Path(out)
    tmp = _fresh_folder(out, force)
    try:
        spec = _build(source, tmp, samples, onnx, threads)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec


def _build(source: ModelSource, folder: Path, samples: list[np.ndarray], onnx: bool, threads: int | None) -> DeploySpec:
    log.info("saving the inference program (legacy format) ...")
    save_program(source.program_spec(), source.weights, folder)
    preprocess = Preprocess(size=tuple(source.input_size))
    batch = model_input(samples, preprocess)
    reference = reference_logits(source, batch)
    candidates = list(backends_for_this_machine())
    rejected: dict[str, str] = {}
    if onnx:
        from steel_seg.deploy.onnx_export import OnnxExportError, convert_to_onnx

        try:
            convert_to_onnx(folder, folder / "model.onnx")
        except OnnxExportError as exc:
            rejected["onnxruntime"] = f"conversion failed: {exc}"
    else:
        rejected["onnxruntime"] = "not exported (pass --onnx)"
    if "onnxruntime" in rejected:
        candidates.remove("onnxruntime")
    passed, failed = check_backends(folder, reference, batch, candidates, threads)
    rejected.update(failed)
    if not passed:
        raise ExportError("no backend reproduces the training-time model:\n" + "\n".join(f"  {k}: {v}" for k, v in rejected.items()))
    default = pick_default(passed)
    scale = float(np.abs(reference).max())
    if not scale > 1e-6:
        log.warning("the model's logits are near zero (max |logit| %.1e): the backend check proves little", scale)
    spec = DeploySpec(
        classes=list(source.class_names),
        preprocess=preprocess,
        postprocess=Postprocess(thresholds=[0.0] * len(source.class_names), min_areas=[0] * len(source.class_names)),
        model={
            "type": source.model_type, "backbone": (source.backbone or {}).get("type"),
            "program": "model.pdmodel", "params": "model.pdiparams",
            "onnx": "model.onnx" if (folder / "model.onnx").is_file() else None,
            "check": {"images": len(samples), "max_abs_logit": scale},
        },
        backends=passed,
        rejected=rejected,
        default_backend=default,
        tta={"views": list(source.tta_views), "merge": source.tta_merge,
             **({"weights": list(source.tta_weights)} if source.tta_weights else {})},
        source={**source.provenance, "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **_versions()},
    )
    spec.write(folder)
    if source.config_yaml:
        (folder / "training_config.yaml").write_text(source.config_yaml)
    (folder / "examples").mkdir()
    cv2.imwrite(str(folder / "examples" / "example.png"), cv2.cvtColor(samples[0], cv2.COLOR_RGB2BGR))
    (folder / "README.md").write_text(export_readme(spec, folder.name.lstrip(".").replace(".partial", "")))
    return spec


def _versions() -> dict:
    import paddle

    from steel_seg import __version__

    return {"steel_seg_version": __version__, "paddle_version": paddle.__version__}


def export_readme(spec: DeploySpec, name: str) -> str:
    rows = "\n".join(
        f"| {b} | {c.ms_per_image:.1f} | {c.max_rel_diff:.1e} | {c.argmax_agreement:.4%} |" for b, c in spec.backends.items()
    )
    not_offered = "\n".join(f"- {b}: {why}" for b, why in spec.rejected.items()) or "- (none)"
    run = spec.source.get("run_id")
    return f"""# {name}: a steel_seg export

{spec.model['type']}{' + ' + spec.model['backbone'] if spec.model.get('backbone') else ''} for {len(spec.classes)} classes
({', '.join(spec.classes)}), input {spec.preprocess.size[0]}x{spec.preprocess.size[1]} (width x height).
{f"From MLflow run `{run}`." if run else ""}

This folder is self-contained: copy it anywhere steel_seg (or just Paddle Inference, NumPy,
OpenCV and PyYAML for `steel_seg.deploy.Predictor`) is installed.

```bash
python -m steel_seg.predict --model {name} images/ --out predictions/   # masks, overlays, submission.csv
python -m steel_seg.predict --model {name} --benchmark images/          # re-measure the backends here
python -m steel_seg.evaluate --model {name} --split val                 # score it like the training run
```

```python
from steel_seg.deploy import Predictor
predictor = Predictor("{name}")            # backend: auto = the fastest that passed its check
mask = predictor.predict_one("image.jpg").mask   # (H, W) class ids at the image's own size
```

`deploy.yaml` describes everything: preprocessing (resize to the model size, normalise with mean
and std), the class names, TTA views, per-class probability thresholds and minimum component
areas (in pixels at the original resolution), and the run and metrics the model came from.

## Backends checked against the training-time model

| backend | ms/image (engine, batch 1) | max relative logit difference | argmax agreement |
|---|---|---|---|
{rows}

Default: `{spec.default_backend}`. Not offered:
{not_offered}
"""
