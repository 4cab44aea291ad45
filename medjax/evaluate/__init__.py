"""Judging trained runs: ``python -m medjax.evaluate --workdir=runs/covid_ct-synthetic``.

Examples::

    python -m medjax.evaluate --workdir=runs/covid_ct-synthetic
    python -m medjax.evaluate --workdir=/work/runs/smoke_ref --data_dir=/tmp/tfds --bootstrap_samples=200
    python -m medjax.evaluate --workdir=runs/seed0 --workdir=runs/seed1 --out=runs/ensemble

Modules: :mod:`~medjax.evaluate.command` (:func:`~medjax.evaluate.command.evaluate_run`, what the
command does), :mod:`~medjax.evaluate.statistics` (bootstrap intervals, decision thresholds,
calibration), :mod:`~medjax.evaluate.figures`, :mod:`~medjax.evaluate.markdown` (``report.md``) and
:mod:`~medjax.evaluate.model_card`. The package itself imports nothing, so a task can use its
statistics without loading the command.
"""
