"""The contract every seed architecture must meet, plus building by name and pretrained weights."""

import numpy as np
import paddle
import pytest

from steel_seg.checkpoint import atomic_save, load_weights
from steel_seg.losses import build_loss
from steel_seg.models import build_model, check_model_spec, load_pretrained, output_weights

ARCHITECTURES = {
    "unet": ("UNet", None),
    "deeplabv3_r50": ("DeepLabV3", {"type": "ResNet50_vd", "output_stride": 8}),
    "hrnet_w18": ("FCN", {"type": "HRNet_W18"}),
    "fastscnn": ("FastSCNN", None),
}


@pytest.fixture(autouse=True)
def cpu():
    paddle.set_device("cpu")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_contract(arch, tmp_path):
    model_type, backbone = ARCHITECTURES[arch]
    paddle.seed(0)
    model = build_model(model_type, 5, backbone)
    images = paddle.to_tensor(np.random.default_rng(0).normal(size=(2, 3, 32, 64)).astype("float32"))
    labels = paddle.to_tensor(np.random.default_rng(1).integers(0, 5, size=(2, 32, 64)).astype("int64"))

    model.train()
    outputs = model(images)
    assert all(list(o.shape) == [2, 5, 32, 64] for o in outputs)
    weights = output_weights(len(outputs))
    assert weights[0] == 1.0 and all(w == 0.4 for w in weights[1:])  # FastSCNN's aux head: 0.4
    loss_fn = build_loss([("CrossEntropyLoss", 0.8), ("DiceLoss", 0.2)])
    loss = sum(w * loss_fn(o, labels) for w, o in zip(weights, outputs))
    assert np.isfinite(float(loss))
    loss.backward()
    grads = [p.grad for p in model.parameters() if not p.stop_gradient]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)

    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    optimizer = paddle.optimizer.Momentum(0.01, momentum=0.9, parameters=model.parameters())
    optimizer.step()
    changed = [k for k, v in model.state_dict().items() if not np.array_equal(before[k], v.numpy())]
    assert changed, "one optimizer step changed no weight"

    atomic_save(model.state_dict(), tmp_path / "model.pdparams")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pdparams"]  # no temp files left
    model.eval()
    paddle.seed(1)
    fresh = build_model(model_type, 5, backbone)
    load_weights(fresh, tmp_path / "model.pdparams")
    fresh.eval()
    np.testing.assert_allclose(fresh(images)[0].numpy(), model(images)[0].numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match=r"unknown model type `Unet`\. Did you mean UNet.*Available: .*FastSCNN"):
        check_model_spec("Unet", None, {})


def test_unknown_backbone_and_bad_kwargs():
    with pytest.raises(ValueError, match="unknown backbone type `ResNet50`.*Did you mean.*ResNet50_vd"):
        check_model_spec("DeepLabV3", {"type": "ResNet50"}, {})
    with pytest.raises(ValueError, match="`UNet` has no argument `use_deconvolution`; did you mean `use_deconv`"):
        check_model_spec("UNet", None, {"use_deconvolution": True})
    with pytest.raises(ValueError, match="needs a backbone"):
        check_model_spec("DeepLabV3", None, {})


def test_aux_weights_must_match_outputs():
    assert output_weights(2, [0.3]) == [1.0, 0.3]
    with pytest.raises(ValueError, match="aux_weights has 2 value"):
        output_weights(2, [0.4, 0.4])


def test_pretrained_full_model_and_backbone(tmp_path, caplog):
    paddle.seed(0)
    source = build_model("FCN", 5, {"type": "HRNet_W18"})
    atomic_save(source.state_dict(), tmp_path / "full.pdparams")
    atomic_save(source.backbone.state_dict(), tmp_path / "backbone.pdparams")

    paddle.seed(1)
    other_classes = build_model("FCN", 3, {"type": "HRNet_W18"})  # head shapes differ
    report = load_pretrained(other_classes, str(tmp_path / "full.pdparams"))
    assert report.target == "model" and report.mismatched and report.loaded > 100
    assert all("head" in m for m in report.mismatched)
    assert "mismatched keys: head.cls.weight: file [5, 270, 1, 1] vs model [3, 270, 1, 1]" in caplog.text
    for key, value in source.backbone.state_dict().items():
        np.testing.assert_array_equal(other_classes.backbone.state_dict()[key].numpy(), value.numpy())

    paddle.seed(2)
    fresh = build_model("FCN", 5, {"type": "HRNet_W18"})
    report = load_pretrained(fresh, str(tmp_path / "backbone.pdparams"))
    assert report.target == "backbone" and not report.missing and not report.unexpected
    key = next(iter(source.backbone.state_dict()))
    np.testing.assert_array_equal(fresh.backbone.state_dict()[key].numpy(), source.backbone.state_dict()[key].numpy())


def test_pretrained_reports_unexpected_keys(tmp_path):
    paddle.seed(0)
    model = build_model("UNet", 5)
    state = dict(model.state_dict())
    state["extra.weight"] = paddle.zeros([2])
    atomic_save(state, tmp_path / "w.pdparams")
    report = load_pretrained(build_model("UNet", 5), str(tmp_path / "w.pdparams"))
    assert report.unexpected == ["extra.weight"] and not report.missing


def test_missing_pretrained_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pretrained: no such file"):
        load_pretrained(build_model("UNet", 5), str(tmp_path / "nope.pdparams"))
