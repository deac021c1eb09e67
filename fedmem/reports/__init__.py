"""The reading wing: tables, CSV files, report.md and figures of run, sweep and audit directories.

It stands on :mod:`fedmem.results`, :mod:`fedmem.config` and the data layer, never on the engine
(sweeps, the round loop, clients, transports, strategies), so ``fedmem report`` and ``fedmem show``
import neither flwr, Ray nor the strategies; on a run or a sweep not even torch. What a reader
needs that only the engine knows (each predictor's display title, the predictors' order, the
versions) the engine writes into ``summary.json``.

* :mod:`~fedmem.reports.directories`: every directory format (run, ``sweep.toml``, ``audit.toml``);
* :mod:`~fedmem.reports.tables`: the run and comparison tables, ``results.csv`` / ``per_client.csv`` rows;
* :mod:`~fedmem.reports.runs`: the report of a run or sweep directory and which figures it draws;
* :mod:`~fedmem.reports.audit`: a leakage audit's analysis, tables and figures;
* :mod:`~fedmem.reports.figures`: the style every figure shares; the figures themselves by audience in
  :mod:`~fedmem.reports.run_figures` and :mod:`~fedmem.reports.leakage_figures`.

Figures and their provenance:

* accuracies are **final-round** test accuracies over clients (mean, sample-weighted mean,
  10th percentile), their hyperparameters (kNN-Per's lambda and k) chosen on each client's
  validation split;
* across seeds a table shows mean ± standard deviation (population, ddof = 0) over the
  seeds that completed;
* "best round" is the best evaluated round's mean accuracy, the round chosen on **test**: a
  test-tuned figure, labelled so wherever it appears; so are the "(oracle)" rows, whose
  hyperparameters were tuned on test.
"""
