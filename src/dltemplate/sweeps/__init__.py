"""Sweeps: many runs of one config, searched by Optuna (``dltemplate sweep``).

:mod:`~dltemplate.sweeps.spec` reads and checks the sweep file, :mod:`~dltemplate.sweeps.study`
builds Optuna's storage, sampler and pruner, :mod:`~dltemplate.sweeps.runner` runs the trials as
ordinary runs, :mod:`~dltemplate.sweeps.report` writes the results.
"""
