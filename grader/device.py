"""What hardware the session runs on: CUDA or not, the Triton interpreter, and the session header.

Without CUDA every Triton kernel runs under the Triton interpreter on the CPU. Triton reads TRITON_INTERPRET when
a kernel is decorated, so it must be set before any exercise module is imported: the plugin calls
`use_interpreter_without_cuda` from `pytest_configure`, long before the first test asks for a module.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os

NO_GPU_REASON = "speed not graded on this hardware: no CUDA GPU"
NEEDS_GPU_REASON = "not graded on this hardware: this test needs a CUDA GPU"


@functools.cache
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def use_interpreter_without_cuda() -> bool:
    """Turn on the Triton interpreter when there is no GPU; return whether it is on."""
    if not cuda_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def gpu_name() -> str | None:
    if not cuda_available():
        return None
    import torch

    return torch.cuda.get_device_name()


def _nvml_lines() -> list[str]:
    try:
        import pynvml
    except ImportError:
        return ["nvml: nvidia-ml-py not installed"]
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(_current_device_index())
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        sm_now = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
        sm_max = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
        mem_clock = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        return [
            f"gpu memory: {mem.total / 2**30:.0f} GiB, driver {_text(driver)}, "
            f"SM clock {sm_now}/{sm_max} MHz, memory clock {mem_clock} MHz"
        ]
    except Exception as exc:  # NVML is informative only: a container without it must still grade
        return [f"nvml: unavailable ({exc})"]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _current_device_index() -> int:
    import torch

    return torch.cuda.current_device()


def header_lines(interpreter: bool) -> list[str]:
    lines = []
    if cuda_available():
        lines.append(f"gpu: {gpu_name()}")
        lines.extend(_nvml_lines())
    else:
        lines.append("gpu: no CUDA GPU (correctness is graded; speed tests are skipped)")
    # Versions from package metadata: importing triton here would load its native module before the tests need it.
    versions = ", ".join(f"{name} {_version(name)}" for name in ("torch", "triton", "transformers"))
    lines.append(f"{versions}; triton interpreter {'on' if interpreter else 'off'}")
    return lines


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
