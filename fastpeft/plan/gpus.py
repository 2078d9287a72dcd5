"""The GPUs a plan is made for: SM count, architecture, memory bandwidth, tensor-core peak, L2.

Vendor datasheet values (dense, i.e. without the 2:4 sparsity the datasheets also quote);
the bandwidths are ``fastpeft.bench.roofline``'s table (the benchmark's roofline), looked up
by a device name torch reports for that GPU, so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastpeft.bench.roofline import peak_bandwidth_gb_s


@dataclass(frozen=True)
class GpuSpec:
    """One GPU: ``sms`` streaming multiprocessors of compute capability ``capability`` (80,
    90: what ``fastpeft.kernels.lora.configs.device_info`` returns on it), ``hbm_gb_s`` peak
    memory bandwidth (1 GB = 1e9 bytes), ``bf16_tflops`` dense bf16 tensor-core peak,
    ``l2_mb`` L2 cache (1 MB = 1e6 bytes)."""

    name: str
    device_name: str
    sms: int
    capability: int
    hbm_gb_s: float
    bf16_tflops: float
    l2_mb: float

    @property
    def l2_bytes(self) -> int:
        return int(self.l2_mb * 1e6)


def _bandwidth(device_name: str) -> float:
    peak = peak_bandwidth_gb_s(device_name)
    if peak is None:
        raise KeyError(f"fastpeft.bench.roofline has no bandwidth for {device_name!r}")
    return peak


GPUS: dict[str, GpuSpec] = {
    # H100 SXM5 80GB: 132 SMs, 3.35 TB/s HBM3, 989.4 TFLOP/s dense BF16 (NVIDIA H100 Tensor
    # Core GPU datasheet), 50 MB L2 (NVIDIA H100 Tensor Core GPU Architecture whitepaper: 50 MB
    # on the SXM5 product of the 60 MB GH100 die). torch names it "NVIDIA H100 80GB HBM3".
    "h100": GpuSpec("h100", "NVIDIA H100 80GB HBM3", 132, 90, _bandwidth("NVIDIA H100 80GB HBM3"), 989.4, 50.0),
    # H200 SXM 141GB: the same GH100 compute (132 SMs, 989 TFLOP/s dense BF16) with 4.8 TB/s
    # HBM3e (NVIDIA H200 datasheet); 60 MB L2 as the project's H200 reported it
    # (KERNEL_NOTES.md, "The GPU machine").
    "h200": GpuSpec("h200", "NVIDIA H200", 132, 90, _bandwidth("NVIDIA H200"), 989.4, 60.0),
    # A100 SXM4 80GB: 108 SMs, 2.039 TB/s HBM2e, 312 TFLOP/s dense BF16, 40 MB L2 (NVIDIA A100
    # Tensor Core GPU datasheet and Ampere architecture whitepaper).
    "a100": GpuSpec("a100", "NVIDIA A100-SXM4-80GB", 108, 80, _bandwidth("NVIDIA A100-SXM4-80GB"), 312.0, 40.0),
}


def gpu_for_device_name(device_name: str) -> GpuSpec | None:
    """The spec of the GPU torch calls ``device_name`` ("NVIDIA H100 80GB HBM3"), or None: the
    name must contain the key and have the spec's bandwidth (an H100 PCIe or NVL is not the
    SXM part tabled here)."""
    lowered = device_name.lower()
    return next((spec for key, spec in GPUS.items()
                 if key in lowered and peak_bandwidth_gb_s(device_name) == spec.hbm_gb_s), None)
