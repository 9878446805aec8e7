"""What may change when a run is resumed: the keys of a recipe that do not change what is trained (`RESUMABLE`), the
comparison of a run's recipe with the one that resumes it, the precision it trains in as resolved, and a checkpoint
at or past the run's last step (`check_finished`)."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from ia3_trainer.errors import RecipeError, shorten
from ia3_trainer.recipe.sections import RECIPE_SECTIONS


# What may change when a run is resumed: how long it trains, what it logs, evaluates and saves, where it pushes, and
# how fast it runs. Every other key changes what is trained (the data, the model, the adapter, the optimizer and its
# schedule), and the resumed run would mix two recipes.
RESUMABLE_SECTIONS = tuple(key for key, section in RECIPE_SECTIONS.items() if section.resumable)
RESUMABLE = frozenset({
    "name", "description", "data.max_eval_samples",
    *(f"training.{key}" for key in (
        "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "num_train_epochs", "max_steps",
        "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
        "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name", "project", "trackio_space_id",
        "trackio_bucket_id", "trackio_static_space_id", "include_num_input_tokens_seen", "skip_memory_metrics",
        "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
        "eval_accumulation_steps", "eval_do_concat_batches", "eval_use_gather_object", "prediction_loss_only",
        "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "predict_with_generate",
        "generation_max_length", "generation_num_beams", "generation_config", "rank_classification",
        "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node",
        "save_final_adapter", "enable_jit_checkpoint", "dataloader_num_workers", "dataloader_pin_memory",
        "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
        "use_cpu", "fused_kernels", "compile_blocks", "torch_compile", "torch_compile_backend", "torch_compile_mode",
        "gradient_checkpointing", "gradient_checkpointing_kwargs", "torch_empty_cache_steps", "ddp_timeout",
        "ddp_backend", "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_static_graph",
        "bf16", "fp16",  # as written; the precision they resolve to is compared instead (`precision`)
    )),
})


def precision(args) -> str:
    """The precision a run trains in, as resolved (`bf16` defaults by the machine, see `IA3TrainingArguments`)."""
    return "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"


def recipe_changes(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """`{dotted key: (saved value, new value)}` for every key whose value differs; a key one recipe leaves out has
    its default value there."""
    changes = {}
    for section in dict.fromkeys([*saved, *new]):
        old, now = saved.get(section), new.get(section)
        if isinstance(old, dict) and isinstance(now, dict):
            defaults = _section_defaults(section)
            for key in dict.fromkeys([*old, *now]):
                before, after = old.get(key, defaults.get(key)), now.get(key, defaults.get(key))
                if _normal(before) != _normal(after):
                    changes[f"{section}.{key}"] = (before, after)
        elif _normal(old) != _normal(now):
            changes[section] = (old, now)
    return changes


def resumable(key: str) -> bool:
    return key in RESUMABLE or key.split(".", 1)[0] in RESUMABLE_SECTIONS


def check_same_recipe(saved: dict | None, new: dict | None, where: Path) -> str | None:
    """Refuse resuming the run of `where` (recipe `saved`) with recipe `new` when a key that is not `resumable`
    changed; else return the line that names the resumable changes (None when there are none), for the run that
    claims the folder to print once (the folder is checked more than once per run)."""
    if saved is None or new is None:
        return None
    changes = recipe_changes(saved, new)
    refused = {key: values for key, values in changes.items() if not resumable(key)}
    if refused:
        raise RecipeError(
            f"training.output_dir: resuming continues the run of {where}, whose recipe differs in {_listed(refused)}; "
            "resuming would mix two recipes: undo those changes, or train into a new training.output_dir (on resume "
            "only the length of the run, logging, evaluation, saving, hub and speed settings may change)"
        )
    shown = {key: values for key, values in changes.items()
             if key not in ("training.output_dir", "training.resume_from_checkpoint")}
    return f"Resuming {where} with {_listed(shown)}" if shown else None


def check_finished(checkpoint: str, step: int, max_steps: int, speak: bool, by_epochs: bool = False) -> None:
    """A resumed run whose checkpoint is at `max_steps` already is finished (its final save is written again); one
    past it was trained to another length, and is refused. `by_epochs`: `max_steps` comes from num_train_epochs."""
    if step > max_steps:
        key = "training.num_train_epochs" if by_epochs else "training.max_steps"
        length = (f"the {max_steps} steps of training.num_train_epochs" if by_epochs
                  else f"training.max_steps {max_steps}")
        fix = "raise training.num_train_epochs" if by_epochs else f"set training.max_steps to {step} or more"
        raise RecipeError(key=key, problem=f"the checkpoint {checkpoint} is at step {step}, past {length}",
                          fix=f"{fix} to continue the run, or set training.overwrite_output_dir to start over")
    if speak:
        print(f"{checkpoint} is at step {step}, the run's last: finishing the run without training")


def run_precision(record: dict | None, recipe: dict | None) -> str | None:
    """The precision a run trained in: recorded in its run.json, else written in its recipe, else unknown (None)."""
    if (record or {}).get("precision"):
        return record["precision"]
    training = (recipe or {}).get("training") or {}
    if training.get("fp16"):
        return "fp16"
    if isinstance(training.get("bf16"), bool):
        return "bf16" if training["bf16"] else "fp32"
    return None


def check_same_precision(old: str | None, new: str | None, saved: dict | None, recipe: dict | None,
                       where: Path) -> None:
    """Refuse a resume that would train in another precision. Where the earlier run's is unknown (bf16 unset, run
    before precision was recorded), the written `training.bf16` and `training.fp16` must not change."""
    if new is None:
        return
    if old is None:
        changed = {key: values for key, values in recipe_changes(saved or {}, recipe or {}).items()
                   if key in ("training.bf16", "training.fp16")}
        if changed and saved is not None and recipe is not None:
            raise RecipeError(
                f"training.output_dir: resuming continues the run of {where}, whose recipe differs in "
                f"{_listed(changed)}; it would train in another precision: undo those changes, or train into a new "
                "training.output_dir"
            )
        return
    if old != new:
        flags = {"bf16": "training.bf16=true", "fp16": "training.fp16=true",
                 "fp32": "training.bf16=false and training.fp16=false"}
        raise RecipeError(
            f"training.bf16: the run of {where} trained in {old} and this one would train in {new} (an unset "
            f"training.bf16 defaults by the machine and device); set {flags[old]} to continue it in {old}, or train "
            "into a new training.output_dir"
        )


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} ({_shown(old)} -> {_shown(new)})" for key, (old, new) in changes.items())


def _shown(value: Any) -> str:
    return "unset" if value is None else shorten(json.dumps(value, default=str), 60)


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@functools.cache
def _section_defaults(section: str) -> dict[str, Any]:
    if section == "training":
        from ia3_trainer.recipe.training_args import IA3TrainingArguments as cls
    elif section == "ia3":
        from peft import IA3Config as cls
    else:
        cls = RECIPE_SECTIONS[section].checked_by if section in RECIPE_SECTIONS else None
    if cls is None:
        return {}
    defaults = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults
