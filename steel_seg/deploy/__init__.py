"""Deployment: export a trained run, and predict with it on the line.

Everything here that `Predictor` needs imports only Paddle Inference (or ONNX Runtime), NumPy,
OpenCV and PyYAML, so an export folder runs where no training stack is installed. The export
side (`steel_seg.deploy.export`) is the one part that needs the training code.
"""

from steel_seg.deploy.predictor import Prediction, Predictor
from steel_seg.deploy.spec import DeploySpec, read_spec

__all__ = ["DeploySpec", "Prediction", "Predictor", "read_spec"]
