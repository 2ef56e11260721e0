"""Inference engines behind one call: `engine.run(batch) -> logits`.

Paddle Inference runs the legacy program (`model.pdmodel`) plain, with oneDNN, with the OpenVINO
engine, or on GPU (optionally TensorRT); ONNX Runtime runs `model.onnx`. The legacy program is
what makes oneDNN and OpenVINO usable at all: Paddle 3's PIR program (`model.json`) fails on
both (see docs/DEPLOY.md). Libraries are imported when an engine opens, so the Predictor does
not need ONNX Runtime unless it uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from steel_seg.deploy.spec import CPU_BACKENDS, GPU_BACKENDS, DeploySpec, SpecError

PROGRAM, PARAMS, ONNX = "model.pdmodel", "model.pdiparams", "model.onnx"


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (library or hardware missing); the message says why."""


def default_threads() -> int:
    return int(os.environ.get("STEEL_SEG_THREADS", 0)) or os.cpu_count() or 1


def cache_dir(name: str) -> Path:
    """A folder under $STEEL_SEG_CACHE (default ~/.cache/steel_seg), created on first use."""
    path = Path(os.environ.get("STEEL_SEG_CACHE", Path.home() / ".cache" / "steel_seg")) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def paddle_has_gpu() -> bool:
    try:
        import paddle

        return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - no CUDA runtime is simply "no GPU"
        return False


def backends_for_this_machine() -> tuple[str, ...]:
    """Backends worth trying here: GPU ones only where Paddle sees a CUDA device."""
    return (GPU_BACKENDS if paddle_has_gpu() else ()) + CPU_BACKENDS


class PaddleEngine:
    """A Paddle Inference predictor on the legacy program, in one of its CPU or GPU modes."""

    def __init__(self, folder: Path, mode: str, threads: int | None = None, max_batch: int = 8):
        import paddle.inference as pi

        program, params = Path(folder) / PROGRAM, Path(folder) / PARAMS
        for path in (program, params):
            if not path.is_file():
                raise SpecError(f"{folder}: missing {path.name}; the export folder is incomplete")
        config = pi.Config(str(program), str(params))
        config.disable_glog_info()
        config.enable_memory_optim()
        if mode in ("gpu", "tensorrt"):
            if not paddle_has_gpu():
                raise BackendUnavailable(f"backend {mode}: this Paddle has no CUDA device")
            config.enable_use_gpu(256, 0)
            if mode == "tensorrt":
                config.enable_tensorrt_engine(
                    workspace_size=1 << 30, max_batch_size=max_batch, min_subgraph_size=3,
                    precision_mode=pi.PrecisionType.Float32, use_static=False, use_calib_mode=False,
                )
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(threads or default_threads())
            if mode == "onednn":
                config.enable_onednn()
            elif mode == "openvino":
                if not hasattr(config, "enable_openvino_engine"):
                    raise BackendUnavailable("backend openvino: this Paddle build has no OpenVINO engine")
                config.disable_onednn()
                # OpenVINO caches compiled models, by default in `./__cache__` of whatever the
                # working directory is; keep them in the user's cache instead.
                config.set_optim_cache_dir(str(cache_dir("openvino")))
                config.enable_openvino_engine(pi.PrecisionType.Float32)
            elif mode == "paddle":
                config.disable_onednn()
            else:
                raise ValueError(f"unknown Paddle Inference mode {mode!r}")
        self.name = mode
        self._predictor = pi.create_predictor(config)
        self._input = self._predictor.get_input_handle(self._predictor.get_input_names()[0])
        self._output = self._predictor.get_output_handle(self._predictor.get_output_names()[0])

    def run(self, batch: np.ndarray) -> np.ndarray:
        self._input.reshape(batch.shape)
        self._input.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        self._predictor.run()
        return self._output.copy_to_cpu()


class OnnxEngine:
    """ONNX Runtime on `model.onnx` (CPU, or CUDA when onnxruntime-gpu is installed)."""

    def __init__(self, folder: Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable('backend onnxruntime: not installed; pip install -e ".[onnx]"') from None
        path = Path(folder) / ONNX
        if not path.is_file():
            raise BackendUnavailable(f"backend onnxruntime: {folder} has no {ONNX} (export with --onnx)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.name = "onnxruntime"
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        self._input = self._session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def open_engine(folder: str | Path, backend: str, threads: int | None = None):
    """An engine for `backend` on the export in `folder`."""
    if backend == "onnxruntime":
        return OnnxEngine(Path(folder), threads)
    return PaddleEngine(Path(folder), backend, threads)


def choose_backend(spec: DeploySpec, requested: str = "auto") -> str:
    """`auto`: the fastest backend that passed its check at export (and can run here)."""
    offered = list(spec.backends)
    if not offered:
        raise SpecError("deploy.yaml offers no backend that passed its check; re-export the model")
    if requested != "auto":
        if requested not in offered:
            why = f" (rejected at export: {spec.rejected[requested]})" if requested in spec.rejected else ""
            raise SpecError(f"backend {requested!r} is not offered by this export{why}; offered: {', '.join(offered)}")
        return requested
    here = backends_for_this_machine()
    usable = [b for b in offered if b in here]
    if not usable:
        raise SpecError(f"none of this export's backends ({', '.join(offered)}) can run on this machine")
    if spec.default_backend in usable:
        return spec.default_backend
    timed = [b for b in usable if spec.backends[b].ms_per_image is not None]
    if timed:
        return min(timed, key=lambda b: spec.backends[b].ms_per_image)
    return min(usable, key=here.index)
