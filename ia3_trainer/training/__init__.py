"""Training: `IA3Seq2SeqTrainer`, the run lifecycle (claim the folder, train, evaluate, write results and report,
wait for pushes), the non-finite-loss guard, atomic checkpoints, the run folder lock and resume checks, saving, and
sweeps and searches over recipes.

May import `ia3_trainer.hub`, `ia3_trainer.inference` and every layer below them, never
`ia3_trainer.cli`.
"""
