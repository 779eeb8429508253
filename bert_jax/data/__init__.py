"""Pretraining and fine-tuning data: sources, instances, loaders."""
