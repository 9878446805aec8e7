"""Fine-tune Hugging Face seq2seq models with IA3 from declarative JSON recipes."""

__version__ = "0.1.0.dev0"

from ia3_trainer.errors import (
    DataError,
    HubError,
    IA3TrainerError,
    InputError,
    MissingPackageError,
    NonFiniteLossError,
    PathError,
    ProcessesDisagreeError,
    RecipeError,
    RunFolderError,
)
from ia3_trainer.recipe.loading import Recipe, apply_overrides, load_recipe
from ia3_trainer.recipe.sections import DataSection, EvalSection, HubSection, ModelSection


def __getattr__(name):
    # The trainer pulls in torch and transformers; import it only when asked for, so that
    # `ia3-trainer --help` and `ia3-trainer validate` start at once.
    if name == "IA3Seq2SeqTrainer":
        from ia3_trainer.training.trainer import IA3Seq2SeqTrainer

        return IA3Seq2SeqTrainer
    if name == "IA3Predictor":
        from ia3_trainer.inference.predictor import IA3Predictor

        return IA3Predictor
    if name == "merge_adapter":
        from ia3_trainer.inference.merging import merge_adapter

        return merge_adapter
    if name == "IA3TrainingArguments":
        from ia3_trainer.recipe.training_args import IA3TrainingArguments

        return IA3TrainingArguments
    if name == "PreparedData":
        from ia3_trainer.data.preparation import PreparedData

        return PreparedData
    if name == "PushAdapterToHubCallback":
        from ia3_trainer.hub.callback import PushAdapterToHubCallback

        return PushAdapterToHubCallback
    if name == "RunOutput":
        from ia3_trainer.training.lifecycle import RunOutput

        return RunOutput
    if name == "run_search":
        from ia3_trainer.training.search import run_search

        return run_search
    raise AttributeError(f"module 'ia3_trainer' has no attribute {name!r}")


__all__ = [
    "DataError",
    "DataSection",
    "EvalSection",
    "HubError",
    "HubSection",
    "IA3Predictor",
    "IA3Seq2SeqTrainer",
    "IA3TrainerError",
    "IA3TrainingArguments",
    "InputError",
    "MissingPackageError",
    "ModelSection",
    "NonFiniteLossError",
    "PathError",
    "PreparedData",
    "ProcessesDisagreeError",
    "PushAdapterToHubCallback",
    "Recipe",
    "RecipeError",
    "RunFolderError",
    "RunOutput",
    "__version__",
    "apply_overrides",
    "load_recipe",
    "merge_adapter",
    "run_search",
]


def __dir__():
    # The lazily imported names too, so that completion and `help(ia3_trainer)` show the whole public API.
    return sorted(__all__)
