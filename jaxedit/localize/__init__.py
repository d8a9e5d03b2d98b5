"""Localization: metrics, corruptions, patching sweeps, attribution, causal tracing, fact lookup, masks."""
