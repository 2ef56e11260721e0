"""The Predictor: preprocessing parity with training, imports, TTA, inputs at any size, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from deploy_support import CLASSES, toy_images, trained_weights
from steel_seg.deploy.export import ModelSource, export_model
from steel_seg.deploy.images import UnreadableImage, decode_rgb, truncation_problem
from steel_seg.deploy.postprocess import probs_to_mask, softmax, upsample_probs
from steel_seg.deploy.predictor import Predictor
from steel_seg.deploy.preprocess import model_input
from steel_seg.deploy.spec import Preprocess, SpecError, read_spec
from steel_seg.transforms import eval_pipeline

SIZE = (64, 32)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deploy")
    weights = trained_weights("UNet", None, root / "best.pdparams", SIZE)
    images, _ = toy_images(2, 64, 128)
    export_model(ModelSource("UNet", None, {}, CLASSES, SIZE, weights, tta_views=["hflip"]), root / "export", images)
    return root / "export"


def _jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def test_preprocessing_matches_the_training_eval_pipeline_bit_for_bit():
    rng = np.random.default_rng(0)
    for shape in [(256, 1600, 3), (32, 64, 3), (100, 77, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        expected, _ = eval_pipeline(SIZE)(image)
        got = model_input([image], Preprocess(size=SIZE))[0]
        assert got.dtype == np.float32 and np.array_equal(got, expected.transpose(2, 0, 1))


def test_predictor_imports_no_training_code_and_no_mlflow(export_dir):
    script = f"""
import sys, json
from steel_seg.deploy import Predictor
p = Predictor({str(export_dir)!r})
p.predict_one({str(export_dir / 'examples' / 'example.png')!r})
print(json.dumps(sorted(m for m in sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    forbidden = {"mlflow", "paddleseg", "pydantic", "matplotlib", "onnxruntime"} | {
        f"steel_seg.{m}" for m in ("trainer", "models", "losses", "transforms", "experiment", "tracking", "config", "evaluation", "metrics")
    }
    assert not loaded & forbidden, loaded & forbidden
    assert "paddle.inference" in loaded


def test_masks_come_back_at_each_images_own_size(export_dir):
    predictor = Predictor(export_dir, tta=[])
    images, _ = toy_images(3, 256, 1600)
    odd = cv2.resize(images[2], (333, 77))
    predictions = predictor.predict([images[0], _jpeg(images[1]), odd])
    assert [p.mask.shape for p in predictions] == [(256, 1600), (256, 1600), (77, 333)]
    assert all(p.mask.dtype == np.uint8 and p.mask.max() < len(CLASSES) for p in predictions)
    with_probs = predictor.predict_one(images[0], return_probs=True)
    assert with_probs.probs.shape == (5, 256, 1600)
    np.testing.assert_allclose(with_probs.probs.sum(axis=0), 1.0, atol=1e-5)
    assert np.array_equal(with_probs.mask, predictions[0].mask)


def test_full_path_is_upsampled_probabilities_then_argmax(export_dir):
    predictor = Predictor(export_dir, tta=[])
    image = toy_images(1, 64, 200)[0][0]
    logits = predictor.logits(model_input([image], predictor.spec.preprocess))[0]
    expected = probs_to_mask(upsample_probs(softmax(logits[None])[0], 200, 64))
    assert np.array_equal(predictor.predict_one(image).mask, expected)


def test_flip_tta_is_the_mean_of_the_view_and_its_undone_flip(export_dir):
    predictor = Predictor(export_dir)  # deploy.yaml says tta: [hflip]
    assert predictor.views == ["identity", "hflip"]
    batch = model_input(toy_images(2, 32, 64)[0], predictor.spec.preprocess)
    plain = softmax(predictor.logits(batch))
    flipped = softmax(predictor.logits(np.ascontiguousarray(batch[:, :, :, ::-1])))[:, :, :, ::-1]
    np.testing.assert_allclose(predictor.model_probs(batch), (plain + flipped) / 2, atol=1e-6)
    assert not np.allclose(plain, flipped, atol=1e-4), "the model is flip-symmetric: the test proves nothing"
    np.testing.assert_allclose(Predictor(export_dir, tta=[]).model_probs(batch), plain, atol=1e-6)


def test_tta_chosen_into_deploy_yaml_is_what_the_predictor_runs(export_dir, tmp_path):
    import shutil

    from steel_seg.deploy.spec import set_tta
    from steel_seg.deploy.tta import parse_view, resolve

    copy = tmp_path / "weighted"
    shutil.copytree(export_dir, copy)
    set_tta(copy, ["blur"], "weighted", [0.5, 0.5], chosen={"run_id": "abc", "split": "val"})
    assert read_spec(copy).tta == {"views": ["blur:3"], "merge": "weighted", "weights": [0.5, 0.5], "chosen": {"run_id": "abc", "split": "val"}}
    predictor = Predictor(copy, backend="paddle")
    batch = model_input(toy_images(2, 32, 64)[0], predictor.spec.preprocess)
    plain = softmax(predictor.logits(batch))
    blurred = softmax(predictor.logits(parse_view("blur").augment(batch, resolve([]).norm)[0]))
    before = predictor.runner.passes
    assert np.array_equal(predictor.model_probs(batch), 0.5 * plain + 0.5 * blurred)
    assert predictor.runner.passes == before + 1  # both views in one engine call
    with pytest.raises(SpecError, match="weights"):
        set_tta(copy, ["blur"], "weighted", [1.0])
    with pytest.raises(SpecError, match="change the input size, but backend openvino"):
        Predictor(copy, backend="openvino", tta=["scale:1.5"])
    assert Predictor(copy, backend="onednn", tta=["scale:1.5"]).predict_one(toy_images(1, 64, 128)[0][0]).mask.shape == (64, 128)


def test_thresholds_from_deploy_yaml_apply_and_can_be_turned_off(export_dir, tmp_path):
    import shutil

    copy = tmp_path / "strict"
    shutil.copytree(export_dir, copy)
    spec = read_spec(copy)
    spec.postprocess.thresholds = [0.0] + [1.0] * 4  # no defect pixel is ever that sure
    spec.write(copy)
    image = toy_images(1, 64, 128)[0][0]
    assert Predictor(copy, tta=[]).predict_one(image).mask.max() == 0
    assert np.array_equal(
        Predictor(copy, tta=[], postprocess=False).predict_one(image).mask, Predictor(export_dir, tta=[]).predict_one(image).mask
    )


def test_truncated_and_corrupt_images_are_named(export_dir, tmp_path):
    image = toy_images(1, 256, 400)[0][0]
    data = _jpeg(image)
    assert truncation_problem(data) is None
    cut = data[: len(data) // 2]
    # OpenCV alone accepts the cut file (grey fill, a warning on stderr): the marker check must not.
    assert cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(UnreadableImage, match="shot.jpg: truncated JPEG"):
        decode_rgb(cut, "shot.jpg")
    path = tmp_path / "garbage.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImage, match="garbage.png"):
        Predictor(export_dir).predict([image, path])
    with pytest.raises(UnreadableImage, match="no such file"):
        Predictor(export_dir).predict([tmp_path / "missing.jpg"])


def test_bad_export_folder_and_backend_are_clear_errors(export_dir, tmp_path):
    with pytest.raises(SpecError, match="not an export folder"):
        Predictor(tmp_path)
    with pytest.raises(SpecError, match="not offered"):
        Predictor(export_dir, backend="onnxruntime")
    with pytest.raises(ValueError, match="Did you mean `hflip`"):
        Predictor(export_dir, tta=["hflp"])
