"""Where a run happened: date, device name, library versions."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
from pathlib import Path

import torch

import fastpeft
from fastpeft.backend import use_triton


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_environment(device: torch.device) -> dict[str, object]:
    """Date (UTC), device, thread count, library versions and which path fastpeft's op takes."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "peft": package_version("peft"),
        "fastpeft": fastpeft.__version__,
        "fastpeft_path": "triton kernels" if use_triton(device) else "torch path",
    }
