"""Evaluation: image metrics, resumable sweeps and their config, Pareto charts, prompt sets, benchmark."""
