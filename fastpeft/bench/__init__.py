"""Benchmark harness: ``fastpeft bench`` / ``python -m fastpeft.bench``.

LoRA linear grid: ``cases`` (shapes, M, r, FLOPs), ``implementations`` (base, naive, PEFT,
torch.compile, fastpeft on the same weights), ``runner`` (the grid loop), ``memory``
(activations saved for backward), ``results`` and ``analysis`` (ratios, TFLOP/s), ``targets``
(the issue's goals), ``report`` / ``export`` / ``plot`` (table, JSON, figure).

Other ops (``--ops``): ``op_bench`` (what they share: rows, ratios, metrics, targets, one runner,
table and JSON), ``bottleneck`` (the bottleneck adapter against AdapterHub's module structure,
its torch.compile and one launch, with the HBM roofline from ``roofline``), ``multi_lora`` (the
multi-LoRA mixed batch against PEFT's adapter_names batch, a loop, vLLM-style padded ranks and
the base linear), ``op_runs`` (their grids per run kind).

Shared by all: ``timing`` (the one timing function), ``spread`` (median and interquartile
range, ratios of ranges, met / missed / inconclusive), ``environment`` (device and versions),
``forced`` (FASTPEFT_BACKEND around a step); ``focused`` (the focused kernel benchmark,
``--focused``, CUDA-graph timed) and ``run_summary`` (scripts/gpu_run.sh's summary).
"""
