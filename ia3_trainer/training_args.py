"""`IA3TrainingArguments`: `Seq2SeqTrainingArguments` plus the few settings this package adds."""

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments


@dataclass
class IA3TrainingArguments(Seq2SeqTrainingArguments):
    """[`~transformers.Seq2SeqTrainingArguments`] for [`IA3Seq2SeqTrainer`]. Every field of the parent works as
    documented there; a recipe's `training` section feeds this class.

    > Parameters that control what is saved

    save_final_adapter (`bool`, *optional*, defaults to `True`):
        Save the adapter, tokenizer and `recipe.json` to `output_dir` when `train()` finishes, so a run from a
        recipe leaves a usable adapter without a separate `save_model()` call.

    > Parameters that differ from the parent's defaults

    predict_with_generate (`bool`, *optional*, defaults to `True`):
        Evaluation generates the label text (free-running), which label accuracy needs. Teacher-forced argmax
        is not a label accuracy: it copies the gold label from the decoder input.
    """

    save_final_adapter: bool = field(
        default=True,
        metadata={"help": "Save the adapter, tokenizer and recipe.json to output_dir when train() finishes."},
    )
    predict_with_generate: bool = field(
        default=True, metadata={"help": "Generate the label text in evaluation (needed for label accuracy)."}
    )
