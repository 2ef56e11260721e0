"""Convert a legacy Paddle inference program (model.pdmodel + model.pdiparams) to ONNX with paddle2onnx.

Runs in a child process: paddle2onnx calls sys.exit(-1) on any conversion error, and its native code can crash the interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

PROGRAM, PARAMS = "model.pdmodel", "model.pdiparams"
INSTALL_HINT = 'pip install -e ".[onnx]"'
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class OnnxExportError(RuntimeError):
    """paddle2onnx is missing, failed or timed out; the message holds its last output."""


def converter_command(model_dir: Path, onnx_path: Path) -> list[str]:
    """The paddle2onnx command line.

    `--optimize_tool None` matters: the default (polygraphy) sets POLYGRAPHY_AUTOINSTALL_DEPS=1 itself,
    and polygraphy then pip-installs onnx_graphsurgeon and ml_dtypes, which bring numpy 2 and break Paddle.
    The default opset (9) is raised by paddle2onnx to the lowest one the model needs (11 for our models).
    `paddle2onnx` has no __main__, so run its command module.
    """
    return [
        sys.executable, "-m", "paddle2onnx.command",
        "--model_dir", str(model_dir),
        "--model_filename", PROGRAM,
        "--params_filename", PARAMS,
        "--save_file", str(onnx_path),
        "--optimize_tool", "None",
        "--enable_onnx_checker", "True",
    ]


def _tail(text: str, lines: int = 15) -> str:
    kept = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    kept = [line for line in kept if line.strip() and "ccache" not in line and "warnings.warn(" not in line]
    errors = [line for line in kept if "[ERROR]" in line]
    tail = kept[-lines:]
    # paddle2onnx logs the real error, then a warning about its temp files: keep the error even if it is not last.
    return "\n".join([e for e in errors if e not in tail] + tail)


def convert_to_onnx(model_dir: Path, onnx_path: Path, timeout: float = 600) -> None:
    """Write `onnx_path` from `model_dir`/model.pdmodel + model.pdiparams; raise OnnxExportError on failure.

    The file is written under a temporary name next to `onnx_path` and renamed when complete, so a
    failed or interrupted conversion leaves nothing at `onnx_path`.
    """
    model_dir, onnx_path = Path(model_dir), Path(onnx_path)
    if importlib.util.find_spec("paddle2onnx") is None:
        raise OnnxExportError(f"paddle2onnx is not installed; {INSTALL_HINT}")
    for name in (PROGRAM, PARAMS):
        if not (model_dir / name).is_file():
            raise OnnxExportError(f"{model_dir} has no {name} (the legacy inference program is what paddle2onnx converts)")
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_path.with_name(f".{onnx_path.name}.partial")
    tmp.unlink(missing_ok=True)
    env = {**os.environ, "POLYGRAPHY_AUTOINSTALL_DEPS": "0", "PYTHONWARNINGS": "ignore"}
    try:
        try:
            done = subprocess.run(
                converter_command(model_dir.resolve(), tmp.resolve()),
                env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stderr or exc.stdout or ""
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
            raise OnnxExportError(f"paddle2onnx took longer than {timeout:.0f} s\n{_tail(out)}".rstrip()) from None
        if done.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            raise OnnxExportError(f"paddle2onnx failed (exit {done.returncode}):\n{_tail(done.stderr or done.stdout)}")
        os.replace(tmp, onnx_path)
    finally:
        tmp.unlink(missing_ok=True)
