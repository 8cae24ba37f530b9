"""Ensembles of finished runs: chosen on the calibration split, fused at score and map level,
saved as a deployable directory and used like a single run.

* :mod:`~adlib.ensemble.runs`: members' scores and maps, aligned per data set x category x seed;
* :mod:`~adlib.ensemble.normalization` and :mod:`~adlib.ensemble.fusion`: the fusion rules;
* :mod:`~adlib.ensemble.fitted`: one fitted ensemble (statistics, weights, thresholds);
* :mod:`~adlib.ensemble.selection`, :mod:`~adlib.ensemble.diversity`, :mod:`~adlib.ensemble.pixels`
  and :mod:`~adlib.ensemble.report`: the ensemble report of a benchmark;
* :mod:`~adlib.ensemble.artifact` and :mod:`~adlib.ensemble.predict`: ``adlib ensemble build``
  and ``adlib predict ENSEMBLE_DIR``.
"""
