"""Datasets: JSONL reading, prompt formatting, the synthetic generator and the data modules."""
