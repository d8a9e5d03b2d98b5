"""Evaluation: the paper's metrics per format, probes, side effects (candidate probabilities: `jaxedit.readout`)."""
