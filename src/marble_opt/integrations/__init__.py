"""Integrations with training frameworks (optional dependencies, imported on demand).

- ``marble_opt.integrations.trl``: ``MarbleGRPOTrainer``, TRL's ``GRPOTrainer`` with per-reward
  gradient balancing (``pip install marble-opt[trl]``).
"""
