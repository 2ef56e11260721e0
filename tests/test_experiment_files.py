"""The shipped experiment files: the seed study's settings, valid and runnable."""

from pathlib import Path

import pytest

from steel_seg.config import load_experiment
from steel_seg.experiment import check_runnable, with_demo_profile
from steel_seg.run import main

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "experiments").glob("*.yaml"))

SEED_STUDY = {  # file: (model, backbone, epochs, augment, loss terms, include_defect_free)
    "deeplabv3_r50": ("DeepLabV3", "ResNet50_vd", 10, "flip", [("CrossEntropyLoss", 1.0)], False),
    "hrnet_w18": ("FCN", "HRNet_W18", 10, "flip", [("CrossEntropyLoss", 1.0)], False),
    "unet": ("UNet", None, 10, "flip", [("CrossEntropyLoss", 1.0)], False),
    "fastscnn": ("FastSCNN", None, 10, "flip", [("CrossEntropyLoss", 1.0)], False),
    "unet_flip": ("UNet", None, 100, "flip", [("CrossEntropyLoss", 1.0)], False),
    "unet_aug": ("UNet", None, 100, "flip_distort_crop", [("CrossEntropyLoss", 1.0)], False),
    "unet_lovasz": ("UNet", None, 100, "flip_distort_crop", [("CrossEntropyLoss", 0.8), ("LovaszSoftmaxLoss", 0.2)], False),
    "unet_dice": ("UNet", None, 100, "flip_distort_crop", [("CrossEntropyLoss", 0.8), ("DiceLoss", 0.2)], False),
    "unet_lovasz_defect_free": ("UNet", None, 100, "flip_distort_crop", [("CrossEntropyLoss", 0.8), ("LovaszSoftmaxLoss", 0.2)], True),
    "unet_dice_defect_free": ("UNet", None, 100, "flip_distort_crop", [("CrossEntropyLoss", 0.8), ("DiceLoss", 0.2)], True),
}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_experiment_file_is_runnable(path):
    config = load_experiment(path)
    check_runnable(config)
    check_runnable(with_demo_profile(config))


@pytest.mark.parametrize("name", list(SEED_STUDY))
def test_seed_settings(name):
    config = load_experiment(ROOT / "experiments" / f"{name}.yaml")
    model, backbone, epochs, augment, terms, defect_free = SEED_STUDY[name]
    assert config.model.type == model and (config.model.backbone or {}).get("type") == backbone
    assert (config.train.epochs, config.augment, config.loss.terms(), config.data.include_defect_free) == (epochs, augment, terms, defect_free)
    assert (config.data.size, config.train.batch_size, config.train.learning_rate) == ((400, 64), 16, 0.01)
    assert (config.train.momentum, config.train.weight_decay, config.train.lr_power) == (0.9, 4e-5, 0.9)
    demo = with_demo_profile(config, ["train.epochs=1"])
    assert demo.train.epochs == 1 and demo.data.size == (200, 32)  # --set wins over the profile
    off = load_experiment(ROOT / "experiments" / f"{name}.yaml", ["demo_profile=null"])
    assert with_demo_profile(off) == off


def test_shipped_pipeline_checks_from_the_command_line(capsys):
    assert main([str(ROOT / "pipeline.yaml"), "--check"]) == 0
    assert "ok: pipeline" in capsys.readouterr().out
