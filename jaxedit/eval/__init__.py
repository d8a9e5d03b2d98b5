"""Evaluation: candidate probabilities ("continuous accuracy"), formats, probes, side effects."""
