"""The guide's recipe on the real Financial PhraseBank, read from a zip laid out like the Hub's original archive."""

import math

import pytest

from ia3_trainer import IA3Seq2SeqTrainer, load_recipe
from ia3_trainer.data.splits import load_splits


def local_overrides(zip_path, tmp_path, tiny_t5_dir):
    return {
        "data.data_files": {"train": f"zip://FinancialPhraseBank-v1.0/Sentences_AllAgree.txt::{zip_path}"},
        "model.name_or_path": str(tiny_t5_dir),
        "training.output_dir": str(tmp_path / "out"),
        "training.use_cpu": True,
    }


def test_recipe_parses_the_original_file(phrasebank_zip, tmp_path, tiny_t5_dir):
    recipe = load_recipe("phrasebank", local_overrides(phrasebank_zip, tmp_path, tiny_t5_dir))
    train, validation = load_splits(recipe.data)
    assert (len(train), len(validation)) == (2037, 227)  # the guide's 90/10 split of 2264 sentences
    labels = train.unique("label") + validation.unique("label")
    assert set(labels) == {"negative", "neutral", "positive"}
    assert all("@" not in label for label in labels)


@pytest.mark.slow
def test_training_lowers_eval_loss_on_real_data(phrasebank_zip, tmp_path, tiny_t5_dir):
    overrides = local_overrides(phrasebank_zip, tmp_path, tiny_t5_dir)
    overrides.update({
        "data.max_train_samples": 512, "training.num_train_epochs": 2, "training.learning_rate": 0.1,
        "training.per_device_train_batch_size": 16, "training.per_device_eval_batch_size": 64,
        "training.eval_strategy": "no", "training.save_strategy": "no", "training.logging_steps": 8,
    })
    trainer = IA3Seq2SeqTrainer.from_recipe("phrasebank", overrides)
    assert len(trainer.eval_dataset) == 227
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for metrics in (before, after):
        assert all(math.isfinite(metrics[k]) for k in ("eval_loss", "eval_perplexity", "eval_label_accuracy"))
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_perplexity"] < before["eval_perplexity"]
    print(f"phrasebank tiny: eval_loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}, "
          f"label_accuracy {before['eval_label_accuracy']:.3f} -> {after['eval_label_accuracy']:.3f}")
