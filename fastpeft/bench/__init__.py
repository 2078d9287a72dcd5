"""Benchmark harness for the LoRA linear op: ``fastpeft bench`` / ``python -m fastpeft.bench``.

Modules: ``cases`` (shapes, M, r, FLOPs), ``implementations`` (base, naive, PEFT,
torch.compile, fastpeft on the same weights), ``timing`` (the one timing function),
``spread`` (median and interquartile range, ratios of ranges, met / missed / inconclusive),
``memory`` (activations saved for backward), ``runner`` (the grid loop), ``results`` and
``analysis`` (ratios, TFLOP/s), ``targets`` (the issue's goals), ``report`` / ``export`` /
``plot`` (table, JSON, figure), ``environment`` (device and versions); ``focused`` (the
focused kernel benchmark, ``--focused``) and ``run_summary`` (scripts/gpu_run.sh's summary).
"""
