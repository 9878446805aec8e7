"""`ia3-trainer train`: run a recipe's training through the run lifecycle and print what it wrote."""

from __future__ import annotations


def train_command(recipe, resume: bool = False, overwrite: bool = False) -> int:
    """`train`: the run is `IA3Seq2SeqTrainer.from_recipe(recipe).train()` (`ia3_trainer.training.lifecycle`); this
    prints what it returns."""
    from ia3_trainer.evaluation.report import summary_text
    from ia3_trainer.training.runs import check_output_dir
    from ia3_trainer.training.trainer import IA3Seq2SeqTrainer

    training = recipe.training_args()
    # One rule: --resume takes the newest whole checkpoint; else a recipe's training.resume_from_checkpoint path.
    resume_from = True if resume else training.resume_from_checkpoint
    overwrite = overwrite or training.overwrite_output_dir
    # The folder's rules, before the data and the model load (the run claims it when it starts).
    check_output_dir(training, recipe.to_dict(), resume=resume_from, overwrite=overwrite)
    if recipe.model.trust_remote_code and training.process_index == 0:
        print(f"ia3-trainer: model.trust_remote_code is on: code from {recipe.model.name_or_path} will run")
    trainer = IA3Seq2SeqTrainer.from_recipe(recipe)
    trainer.args.overwrite_output_dir = overwrite  # --overwrite: for this run, not written into its recipe.json

    def print_results(output) -> None:
        print(_summary(output.metrics, trainer.args.output_dir))
        if output.report_paths:
            print(summary_text(output.report, output.report_paths))

    trainer.train(resume_from_checkpoint=resume_from, on_results=print_results)
    return 0


def _summary(metrics: dict, output_dir: str) -> str:
    keys = [
        "train_loss", "train_perplexity", "eval_loss", "eval_perplexity", "eval_label_accuracy", "eval_rank_accuracy"
    ]
    shown = "  ".join(f"{key}={metrics[key]:.4f}" for key in keys if key in metrics)
    return f"{shown}\nadapter, tokenizer and recipe.json saved to {output_dir}"

