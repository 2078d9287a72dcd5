"""The memory roofline: a device's peak memory bandwidth, and the bandwidth a timing achieved.

Peaks are the vendors' datasheet numbers for HBM (GB/s, 1 GB = 1e9 bytes), keyed by a piece of
``torch.cuda.get_device_name`` (first match wins, so the more specific names come first).
Sources: NVIDIA H200 datasheet (H200 SXM 4.8 TB/s; H200 NVL 4.8 TB/s), H100 datasheet (SXM 3.35
TB/s, PCIe 2.0 TB/s, NVL 3.9 TB/s), A100 datasheet (80GB SXM 2.039 TB/s, 80GB PCIe 1.935 TB/s,
40GB 1.555 TB/s), L40S datasheet (864 GB/s). A device not listed has no peak: its achieved
bandwidth is reported, its fraction of the roofline is not.
"""

from __future__ import annotations

import torch

from fastpeft.bench.spread import Spread

PEAK_BANDWIDTH_GB_S: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM (HBM3)
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100-PCIE-80GB", 1935.0),
    ("A100", 1555.0),  # 40GB
    ("L40S", 864.0),
)


def peak_bandwidth_gb_s(device_name: str) -> float | None:
    """The datasheet peak memory bandwidth of the GPU called ``device_name``, or None."""
    for key, peak in PEAK_BANDWIDTH_GB_S:
        if key.lower() in device_name.lower():
            return peak
    return None


def device_peak_gb_s(device: torch.device) -> float | None:
    """``peak_bandwidth_gb_s`` of a CUDA device; None on CPU."""
    if device.type != "cuda":
        return None
    return peak_bandwidth_gb_s(torch.cuda.get_device_name(device))


def achieved_gb_s(nbytes: int, ms: Spread) -> Spread:
    """GB/s of moving ``nbytes`` in ``ms`` (the range from the time's range)."""
    return ms.rate(nbytes / 1e6)  # bytes / (ms * 1e-3) / 1e9


def fraction_of_peak(gb_s: Spread, peak: float) -> Spread:
    """Achieved over peak bandwidth (1.0: the roofline)."""
    return Spread(gb_s.value / peak, gb_s.low / peak, gb_s.high / peak)
