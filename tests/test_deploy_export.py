"""Export -> every backend this machine offers matches the training-time model, per architecture.

Each export is of a model trained a few steps (non-degenerate logits). The reference is computed
here with the dygraph model; the backends run through the Predictor's engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest
import yaml

from deploy_support import ARCHITECTURES, CLASSES, toy_images, trained_weights
from steel_seg.checkpoint import load_weights
from steel_seg.deploy.export import MAX_REL_DIFF, MIN_AGREEMENT, TIE_MARGIN, ExportError, ModelSource, compare_logits, export_model
from steel_seg.deploy.predictor import Predictor
from steel_seg.deploy.preprocess import model_input
from steel_seg.deploy.spec import CPU_BACKENDS, Preprocess, read_spec
from steel_seg.models import build_model
from steel_seg.tta import main_logits

pytestmark = pytest.mark.slow
SIZE = (64, 32)  # model input, width x height


def _source(name: str, weights: Path) -> ModelSource:
    model_type, backbone = ARCHITECTURES[name]
    return ModelSource(model_type, backbone, {}, CLASSES, SIZE, weights)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_offered_backend_matches_the_training_time_model(tmp_path, name):
    model_type, backbone = ARCHITECTURES[name]
    weights = trained_weights(model_type, backbone, tmp_path / "best.pdparams", SIZE)
    images, _ = toy_images(3, 64, 128, seed=5)  # twice the model size: the export resizes
    spec = export_model(_source(name, weights), tmp_path / "export", images[:2], onnx=True)

    model = build_model(model_type, len(CLASSES), dict(backbone) if backbone else None)
    load_weights(model, weights)
    model.eval()
    batch = model_input(images, Preprocess(size=SIZE))  # includes an image the export never saw
    with paddle.no_grad():
        reference = main_logits(model(paddle.to_tensor(batch))).numpy()
    assert np.abs(reference).max() > 1e-3, "degenerate logits prove nothing"

    written = read_spec(tmp_path / "export")
    assert set(written.backends) == set(spec.backends)
    expected = {"openvino", "onednn", "paddle"} | ({"onnxruntime"} if name != "FastSCNN" else set())
    assert expected <= set(spec.backends), spec.rejected
    for backend in spec.backends:
        logits = Predictor(tmp_path / "export", backend=backend).logits(batch)
        rel, agreement = compare_logits(reference, logits)
        print(f"{name} {backend}: relative {rel:.2e}, argmax agreement {agreement:.4%}")
        assert rel <= MAX_REL_DIFF and agreement >= MIN_AGREEMENT
        check = written.backends[backend]
        assert check.max_rel_diff <= MAX_REL_DIFF and check.argmax_agreement >= MIN_AGREEMENT and check.ms_per_image > 0
    if "onnxruntime" not in spec.backends:  # FastSCNN: converted, but refused by ONNX Runtime
        assert spec.rejected["onnxruntime"]
    # The default is the fastest, or an earlier-preferred backend timed within TIE_MARGIN of it.
    timings = {b: c.ms_per_image for b, c in written.backends.items()}
    fastest = min(timings.values())
    assert timings[written.default_backend] <= fastest * TIE_MARGIN
    preferred_ties = [b for b in CPU_BACKENDS[: CPU_BACKENDS.index(written.default_backend)]
                      if b in timings and timings[b] <= fastest * TIE_MARGIN]
    assert not preferred_ties, (written.default_backend, timings)
    for file in ("model.pdmodel", "model.pdiparams", "deploy.yaml", "README.md", "examples/example.png"):
        assert (tmp_path / "export" / file).is_file(), file
    assert not (tmp_path / "export" / "model.json").exists()  # the legacy program, not PIR


def test_export_never_overwrites_and_leaves_nothing_half_written(tmp_path):
    weights = trained_weights("UNet", None, tmp_path / "best.pdparams", SIZE, steps=1)
    images, _ = toy_images(2, 32, 64)
    out = tmp_path / "export"
    export_model(_source("UNet", weights), out, images)
    before = (out / "deploy.yaml").read_text()
    with pytest.raises(ExportError, match="already exists"):
        export_model(_source("UNet", weights), out, images)
    assert (out / "deploy.yaml").read_text() == before

    wrong = tmp_path / "wrong.pdparams"
    paddle.save({"not": paddle.zeros([1])}, str(wrong))  # weights of another model
    with pytest.raises(Exception, match="weights do not fit"):
        export_model(_source("UNet", wrong), tmp_path / "broken", images)
    assert not (tmp_path / "broken").exists()
    assert not list(tmp_path.glob(".broken*")), "a partial folder was left behind"

    with pytest.raises(Exception, match="weights do not fit"):  # --force with a failing export keeps the old one
        export_model(_source("UNet", wrong), out, images, force=True)
    assert (out / "deploy.yaml").read_text() == before
    data = yaml.safe_load((out / "deploy.yaml").read_text())
    assert data["preprocess"]["size"] == list(SIZE) and data["classes"] == CLASSES
