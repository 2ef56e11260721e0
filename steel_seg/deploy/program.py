"""Save a trained model as a legacy Paddle inference program, in a child process.

Paddle 3 writes its new PIR program (`model.json`) unless `FLAGS_enable_pir_api=0` is in the
environment *before* Paddle is imported; setting the flag at run time is accepted but ignored.
The legacy `model.pdmodel` is what Paddle Inference can run with oneDNN and OpenVINO (the PIR
program fails there), and what paddle2onnx converts. Hence a child process with the variable set.

    python -m steel_seg.deploy.program SPEC.json   # what save_program runs
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


class ProgramExportError(RuntimeError):
    """The child process could not save the program; the message holds its last output."""


def save_program(model_spec: dict, weights: Path, out_dir: Path, timeout: float = 1800) -> None:
    """Write model.pdmodel + model.pdiparams for `model_spec` with `weights` into `out_dir`.

    model_spec: {"type", "backbone", "kwargs", "num_classes", "input_size": [w, h]}.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    job = out_dir / ".program_spec.json"
    job.write_text(json.dumps({**model_spec, "weights": str(Path(weights).resolve()), "out": str(out_dir.resolve())}))
    env = {**os.environ, "FLAGS_enable_pir_api": "0"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "steel_seg.deploy.program", str(job)],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ProgramExportError(f"saving the inference program took longer than {timeout:.0f} s") from None
    finally:
        job.unlink(missing_ok=True)
    if done.returncode != 0 or not (out_dir / "model.pdmodel").is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ProgramExportError(f"saving the inference program failed (exit {done.returncode}):\n{tail}")


def _main(job_file: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    if os.environ.get("FLAGS_enable_pir_api") != "0":
        raise SystemExit("run through save_program(): FLAGS_enable_pir_api=0 must be set before Paddle is imported")
    import paddle

    from steel_seg.checkpoint import load_weights
    from steel_seg.models import build_model

    class MainHead(paddle.nn.Layer):
        """Only the main head's logits: auxiliary heads (FastSCNN) are for training."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            out = self.model(x)
            return out[0] if isinstance(out, (list, tuple)) else out

    job = json.loads(Path(job_file).read_text())
    paddle.set_device("cpu")
    model = build_model(job["type"], job["num_classes"], job.get("backbone"), **job.get("kwargs", {}))
    load_weights(model, Path(job["weights"]))
    wrapped = MainHead(model)
    wrapped.eval()
    width, height = job["input_size"]
    spec = paddle.static.InputSpec([None, 3, height, width], "float32", "x")
    paddle.jit.save(wrapped, str(Path(job["out"]) / "model"), input_spec=[spec])


if __name__ == "__main__":
    _main(sys.argv[1])
