"""The Hugging Face Hub: uploading an adapter folder (allow-list, redaction, timeouts), the push callback, and the
model card.

May import `ia3_trainer.evaluation` and every layer below it, never `ia3_trainer.inference`, `training` or
`cli`.
"""
