"""``fastpeft tune``: validate the kernels on this machine's GPU, time the ones that passed beside
the torch path, and write the per-device table ``FASTPEFT_BACKEND=auto`` then follows
(``fastpeft.kernels.tuned_table``).

Modules: ``numerics`` (the per-dtype tolerances and error measures, shared with the tests),
``shapes`` (the layer shapes and row counts to tune: a transformers config's or Llama-3-8B's),
``validate`` (one implementation at one shape against float64), ``run`` (validate, time,
choose, under a time budget), ``table_file`` (the table written atomically), ``cli``.
"""
