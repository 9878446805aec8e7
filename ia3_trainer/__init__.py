"""Fine-tune Hugging Face seq2seq models with IA3 from declarative JSON recipes."""

__version__ = "0.1.0.dev0"

from .errors import (
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
from .recipe import Recipe, apply_overrides, load_recipe
from .sections import DataSection, EvalSection, HubSection, ModelSection


def __getattr__(name):
    # The trainer pulls in torch and transformers; import it only when asked for, so that
    # `ia3-trainer --help` and `ia3-trainer validate` start at once.
    if name == "IA3Seq2SeqTrainer":
        from .trainer import IA3Seq2SeqTrainer

        return IA3Seq2SeqTrainer
    if name in ("IA3Predictor", "merge_adapter"):
        from . import predictor

        return getattr(predictor, name)
    if name == "IA3TrainingArguments":
        from .training_args import IA3TrainingArguments

        return IA3TrainingArguments
    if name == "PreparedData":
        from .data import PreparedData

        return PreparedData
    if name == "PushAdapterToHubCallback":
        from .hub import PushAdapterToHubCallback

        return PushAdapterToHubCallback
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
    "__version__",
    "apply_overrides",
    "load_recipe",
    "merge_adapter",
]
