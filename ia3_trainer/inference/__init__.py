"""Using a trained adapter: reading an adapter folder or Hub repo, `IA3Predictor` (mixed batches), and
`merge_adapter`.

May import `ia3_trainer.evaluation` and every layer below it, never `ia3_trainer.hub`, `training` or `cli`.
"""
