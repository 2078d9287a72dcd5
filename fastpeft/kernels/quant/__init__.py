"""Quantized base weights (bitsandbytes' 4-bit NF4 / FP4 with optional double quantization, and
its row-wise int8): their layout and the reference dequantization (``ref``)."""
