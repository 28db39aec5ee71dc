"""The evaluations: scripts run from the repository root as ``python -m evals.<name> ...``, the kit they share
(:mod:`evals.common`) and the toy task two of them train on (:mod:`evals.toy`)."""
