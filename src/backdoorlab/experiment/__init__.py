"""Declarative experiments: ``backdoorlab run EXPERIMENT.toml`` (config, cells, executors, summary)."""
