"""The Model Registry side of deploy: log an export to a run, register it as a pyfunc model, move
the champion alias, then load and serve `models:/steel-seg@champion` as a user would, against a
real temporary sqlite store read back with MlflowClient."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from steel_seg.deploy import Predictor
from steel_seg.deploy.images import UnreadableImage
from steel_seg.deploy.pyfunc_model import SteelSegModel, decode_mask_png
from steel_seg.tracking import (
    RunTracker,
    log_export,
    model_version_for_alias,
    register_export,
)

# Every test needs the trained export (about 40 s to build on a 2-core CPU).
pytestmark = pytest.mark.slow

CLASSES = ["background", "defect_1", "defect_2", "defect_3", "defect_4"]
MODEL = "steel-seg"
HEIGHT, WIDTH = 32, 64


@dataclass
class Export:
    folder: Path
    images: list[np.ndarray]
    """RGB test images: the model's size, twice it (resized on the way in), and an odd size."""


@dataclass
class Registry:
    uri: str
    run_id: str
    export: Export
    versions: list[str]


def training_pair(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark noisy image with one coloured box; the box's class is 1 + k % 4."""
    image = rng.integers(40, 90, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    label = np.zeros((HEIGHT, WIDTH), np.int64)
    c = 1 + k % 4
    r0, c0 = rng.integers(0, HEIGHT - 12), rng.integers(0, WIDTH - 20)
    label[r0:r0 + 12, c0:c0 + 20] = c
    image[label == c] = [60 * c, 255 - 50 * c, 200]
    return image, label


def train_tiny_unet(weights: Path, steps: int = 3) -> None:
    """A few SGD steps of UNet on box images, so the export has weights with a real argmax."""
    import paddle

    from steel_seg.checkpoint import atomic_save
    from steel_seg.losses import build_loss
    from steel_seg.models import build_model
    from steel_seg.tta import main_logits

    paddle.seed(0)
    rng = np.random.default_rng(0)
    pairs = [training_pair(rng, k) for k in range(4)]
    x = np.stack([(image.astype(np.float32) / 255 - 0.5) / 0.5 for image, _ in pairs]).transpose(0, 3, 1, 2)
    y = np.stack([label for _, label in pairs])
    model = build_model("UNet", len(CLASSES))
    loss_fn = build_loss([("CrossEntropyLoss", 1.0)])
    optimizer = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
    for _ in range(steps):
        loss = loss_fn(main_logits(model(paddle.to_tensor(x))), paddle.to_tensor(y))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    atomic_save(model.state_dict(), weights)


def build_export(root: Path) -> Export:
    from steel_seg.deploy.export import ModelSource, export_model

    weights = root / "tiny.pdparams"
    train_tiny_unet(weights)
    rng = np.random.default_rng(1)
    images = [training_pair(rng, k)[0] for k in range(2)]
    images[1] = cv2.resize(images[1], (2 * WIDTH, 2 * HEIGHT), interpolation=cv2.INTER_NEAREST)
    images.append(cv2.resize(training_pair(rng, 3)[0], (101, 45), interpolation=cv2.INTER_NEAREST))
    source = ModelSource(
        model_type="UNet", backbone=None, kwargs={}, class_names=CLASSES,
        input_size=(WIDTH, HEIGHT), weights=weights,
    )
    folder = root / "unet_tiny"
    export_model(source, folder, samples=images[:2], force=True)
    return Export(folder, images)


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless, so the Predictor and the served model see exactly the same pixels."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def truncated_jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()[: len(data) // 2]


def expected_masks(export: Export) -> list[np.ndarray]:
    return [p.mask for p in Predictor(export.folder).predict([png_bytes(i) for i in export.images])]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Export:
    return build_export(tmp_path_factory.mktemp("export"))


def make_registry(root: Path, export: Export) -> Registry:
    """A FINISHED training run with the export logged to it and registered twice."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with RunTracker(uri, "registry-test", run_name="tiny-unet") as tracker:
        tracker.log_metrics({"final_val_miou": 0.5})
    run_id = tracker.run_id
    log_export(uri, run_id, export.folder, {"export/ms_per_image": 12.5, "export/skipped": float("nan")})
    example = png_bytes(export.images[0])
    versions = [
        register_export(uri, run_id, export.folder, example_image=example, tags={"stage": "first"}),
        register_export(uri, run_id, export.folder, example_image=example, tags={"stage": "second"}),
    ]
    return Registry(uri, run_id, export, versions)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, export) -> Registry:
    return make_registry(tmp_path_factory.mktemp("store"), export)


@pytest.fixture(scope="module")
def champion(registry):
    """`models:/steel-seg@champion` loaded through the tracking URI, as a user would."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registry.uri)
        return mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")


# ---------------------------------------------------------------------------------------------
# The pyfunc wrapper on its own


def test_export_has_a_real_argmax(export):
    """Trained weights: the masks hold more than one class, so comparing masks means something."""
    masks = expected_masks(export)
    assert len(np.unique(np.concatenate([m.ravel() for m in masks]))) > 1
    assert [m.shape for m in masks] == [i.shape[:2] for i in export.images]


def test_wrapper_output_schema_and_raw_bytes(export):
    model = SteelSegModel()
    model.predictor = Predictor(export.folder)
    data = [png_bytes(i) for i in export.images]
    out = model.predict(None, pd.DataFrame({"image": [b64(data[0]), data[1], b64(data[2])]}))
    assert list(out.columns) == ["height", "width", "mask_png", *(f"pixels_{c}" for c in CLASSES[1:])]
    for row, image, mask in zip(out.itertuples(index=False), export.images, expected_masks(export)):
        decoded = decode_mask_png(row.mask_png)
        assert decoded.dtype == np.uint8 and np.array_equal(decoded, mask)
        assert (row.height, row.width) == image.shape[:2]
        counts = np.bincount(mask.ravel(), minlength=len(CLASSES))
        assert [getattr(row, f"pixels_{c}") for c in CLASSES[1:]] == counts[1:].tolist()


def test_wrapper_names_the_row_of_bad_input(export):
    model = SteelSegModel()
    model.predictor = Predictor(export.folder)
    good = b64(png_bytes(export.images[0]))
    with pytest.raises(UnreadableImage, match=r"^row 1: not valid base64"):
        model.predict(None, pd.DataFrame({"image": [good, "not base64 !"]}))
    with pytest.raises(UnreadableImage, match=r"^row 2: truncated JPEG"):
        model.predict(None, pd.DataFrame({"image": [good, good, b64(truncated_jpeg(export.images[0]))]}))
    with pytest.raises(ValueError, match="column 'image'"):
        model.predict(None, pd.DataFrame({"img": [good]}))


# ---------------------------------------------------------------------------------------------
# Registry: versions, alias, tags, the run left as it was


def aliases(client: MlflowClient) -> dict[str, str]:
    # The sqlite store hands version numbers back as int, though the API documents strings.
    return {alias: str(version) for alias, version in client.get_registered_model(MODEL).aliases.items()}


def test_alias_moves_and_old_version_keeps_its_tags(registry):
    client = MlflowClient(registry.uri)
    assert registry.versions == ["1", "2"]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "2"
    assert champion.tags == {"run_id": registry.run_id, "stage": "second"}
    first = client.get_model_version(MODEL, "1")
    assert first.tags == {"run_id": registry.run_id, "stage": "first"}
    assert first.aliases == [] and first.run_id == registry.run_id
    assert aliases(client) == {"champion": "2"}
    assert str(model_version_for_alias(registry.uri, MODEL, "champion").version) == "2"
    with pytest.raises(ValueError, match=r"no alias 'staging'; its aliases: @champion -> version 2"):
        model_version_for_alias(registry.uri, MODEL, "staging")
    with pytest.raises(ValueError, match="no registered model 'nope'.*steel-seg"):
        model_version_for_alias(registry.uri, "nope", "champion")


def test_run_keeps_status_and_gets_export_and_models(registry):
    client = MlflowClient(registry.uri)
    run = client.get_run(registry.run_id)
    assert run.info.status == "FINISHED"
    assert mlflow.active_run() is None
    assert run.data.metrics["export/ms_per_image"] == 12.5
    assert "export/skipped" not in run.data.metrics
    name = registry.export.folder.name
    logged = {a.path for a in client.list_artifacts(registry.run_id, f"export/{name}")}
    assert {f"export/{name}/deploy.yaml", f"export/{name}/model.pdmodel", f"export/{name}/model.pdiparams"} <= logged
    # Both versions are LoggedModels of the run, in the run's experiment, and READY.
    outputs = [o.model_id for o in run.outputs.model_outputs]
    assert len(outputs) == 2
    for version in registry.versions:
        mv = client.get_model_version(MODEL, version)
        # The sqlite registry keeps no model_id column (it reads back None): the source names it.
        assert mv.source.startswith("models:/m-")
        model = client.get_logged_model(mv.source[len("models:/"):])
        assert model.model_id in outputs
        assert model.experiment_id == run.info.experiment_id and model.status == LoggedModelStatus.READY
        assert model.source_run_id == registry.run_id


def test_failed_registration_leaves_run_and_tracking_uri_as_they_were(registry, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert not mlflow.is_tracking_uri_set()

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mlflow.pyfunc, "save_model", broken_save)
    with RunTracker(registry.uri, "registry-test", run_name="fails-to-register") as tracker:
        pass
    before = MlflowClient(registry.uri).get_run(tracker.run_id).info
    with pytest.raises(RuntimeError, match="disk full"):
        register_export(registry.uri, tracker.run_id, registry.export.folder)
    after = MlflowClient(registry.uri).get_run(tracker.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)
    assert mlflow.active_run() is None
    assert not mlflow.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ
    client = MlflowClient(registry.uri)
    assert aliases(client) == {"champion": "2"}
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 2
    # The half-logged model is marked FAILED, not left PENDING.
    outputs = client.get_run(tracker.run_id).outputs.model_outputs
    assert [client.get_logged_model(o.model_id).status for o in outputs] == [LoggedModelStatus.FAILED]


# ---------------------------------------------------------------------------------------------
# Loading and serving the champion


def test_champion_pyfunc_masks_equal_predictor(registry, champion):
    images = registry.export.images
    out = champion.predict(pd.DataFrame({"image": [b64(png_bytes(i)) for i in images]}))
    assert len(out) == len(images)
    for text, mask in zip(out["mask_png"], expected_masks(registry.export)):
        assert np.array_equal(decode_mask_png(text), mask)


def test_champion_pyfunc_names_the_truncated_row(registry, champion):
    images = registry.export.images
    frame = pd.DataFrame({"image": [b64(png_bytes(images[0])), b64(truncated_jpeg(images[1]))]})
    with pytest.raises(Exception, match=r"row 1: truncated JPEG"):
        champion.predict(frame)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, payload: dict, timeout: float = 60) -> tuple[int, str]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_until_ready(server: subprocess.Popen, url: str, log: Path, limit: float = 150) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"`mlflow models serve` exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"`mlflow models serve` not ready after {limit:.0f} s:\n{log.read_text()[-4000:]}")


def test_champion_served_over_http(registry, tmp_path):
    bin_dir = Path(sys.executable).parent
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry.uri,
        # The CLI starts `uvicorn` by name: without the venv's bin first it exits with 127.
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(server, f"{base}/ping", log)
        images = registry.export.images
        payload = {"dataframe_split": {"columns": ["image"], "data": [[b64(png_bytes(i))] for i in images]}}
        status, body = post_json(f"{base}/invocations", payload)
        assert status == 200, body
        rows = json.loads(body)["predictions"]
        assert len(rows) == len(images)
        for row, mask in zip(rows, expected_masks(registry.export)):
            assert np.array_equal(decode_mask_png(row["mask_png"]), mask)
            assert (row["height"], row["width"]) == mask.shape
        bad = {"dataframe_split": {"columns": ["image"], "data": [[b64(truncated_jpeg(images[0]))]]}}
        status, body = post_json(f"{base}/invocations", bad)
        assert status >= 400 and "row 0: truncated JPEG" in body, (status, body[:2000])
    finally:
        # The CLI runs uvicorn as a child: end the whole session we started, not just the CLI.
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        except ProcessLookupError:
            pass
