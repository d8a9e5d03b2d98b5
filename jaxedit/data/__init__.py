"""Datasets: sports facts and CounterFact (built-in samples and loaders), general text, and length-bucketed batching."""
