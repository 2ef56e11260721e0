"""steel_seg: YAML-driven defect segmentation experiments on PaddlePaddle, tracked in MLflow."""

__version__ = "0.1.0"
