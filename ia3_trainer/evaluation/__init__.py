"""Evaluation: metric functions (pure numpy; the one registry of metrics), the trainer's evaluation loop on top of
the scoring kernel, and the evaluation report with its plots.

May import `ia3_trainer.modeling`, `ia3_trainer.data`, `ia3_trainer.recipe` and the top modules.
"""
