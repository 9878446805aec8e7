"""`ia3-trainer merge`: fold an adapter into its base model and save a plain transformers model."""

from __future__ import annotations


def merge_command(args) -> int:
    from ia3_trainer.cli.adapters import announce_remote_code
    from ia3_trainer.inference.merging import merge_adapter

    announce_remote_code(args)
    path = merge_adapter(args.adapter, args.merged_dir, revision=args.revision, overwrite=args.overwrite,
                         trust_remote_code=args.trust_remote_code)
    print(f"merged model and tokenizer saved to {path}; load it with AutoModelForSeq2SeqLM.from_pretrained")
    return 0
