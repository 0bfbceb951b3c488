"""The demo application: the shapes world, the five training stages chained, the graded report.

  __main__     ``python -m train.demo`` (``make demo``): world, stages, evaluation, report
  workflow     the stages' configs wired to each other's workdirs, resumable runs
  report       grading on the shapes world, report.md / report.json
  machine      what a timing was measured on (the report and the bench scripts)
  experiments  ``python -m train.demo.experiments.data_mix``: the method's data-mix finding

The only place that wires stage paths together; the trainer (``train``) knows no demo.
"""
