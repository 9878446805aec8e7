"""Data: reading sources (local files, Hub datasets), splits, columns and labels, encoding examples (the one
`encode` used by training and inference), the padding collator, the starter recipe read from a data file, and the
data fingerprint a run records.

May import `ia3_trainer.recipe` and the top modules.
"""
