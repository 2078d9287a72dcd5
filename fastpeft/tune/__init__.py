"""``fastpeft tune``: validate the kernels on this machine's GPU, time the ones that passed beside
the torch path, and write the per-device table ``FASTPEFT_BACKEND=auto`` then follows
(``fastpeft.kernels.tuned_table``).

Modules: ``numerics`` (the per-dtype tolerances and error measures, shared with the tests),
``bottleneck_bounds`` (the bottleneck adapter's reference activations and magnitude bounds,
shared with the tests), ``shapes`` (what a run covers: a transformers config's or Llama-3-8B's
shapes, row counts, ranks), ``checks`` (the problem, the outcome of a check, the comparison
with float64), one module per op (``lora``, ``bottleneck``, ``multi_lora``: its
implementations, validation, timed steps and cases) gathered by ``ops``, ``run`` (validate,
time, choose, under a time budget), ``progress`` (the bar), ``table_file`` (the table written
atomically), ``cli``.
"""
