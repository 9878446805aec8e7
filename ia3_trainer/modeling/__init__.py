"""Models: loading the tokenizer and base model with their fixes, IA3 targets per architecture, the IA3 layer
forward (mixed-adapter batches), fused kernels, the scoring kernel every evaluation runs (token losses, rank
classification, bounded generation), and CPU thread settings.

May import `ia3_trainer.data`, `ia3_trainer.recipe` and the top modules.
"""
