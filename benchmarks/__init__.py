"""The bsr_kernels benchmarks, a package: run them from the repository root with ``python -m``.

* ``python -m benchmarks.run --device cpu|cuda [--quick] --out DIR``: the suite; its sections are
  ``bench_drop_compare`` (drop_tokens), ``bench_attention`` (attention), ``bench_train_step``
  (train_step) and ``bench_scaling`` (memory), each also runnable alone
  (``python -m benchmarks.bench_train_step --quick``).
* ``python -m benchmarks.readme_section DIR/results.json``: the README's Performance section.
* ``python -m benchmarks.bench_gpu --out DIR``: the GPU run (with ``peer_bsr``, the plain-PyTorch
  BSR peer and its CLS-row drop).

Shared pieces: ``_suite`` (configuration, models, the training variants of
:mod:`bsr_kernels.methods`, the one input builder ``make_inputs``) and ``_timing`` (the one
timer module).
"""
