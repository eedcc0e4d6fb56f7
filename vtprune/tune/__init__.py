"""Calibration, search and training built on the public API (``vtprune.wrap`` / ``unwrap``).

Runtime methods live below the API in :mod:`vtprune.methods`; what fits a method to a model lives here:
:mod:`vtprune.tune.dyvte` trains DyVTE's exit gates.
"""
