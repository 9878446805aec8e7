"""Saving for [`IA3Seq2SeqTrainer`]: the adapter (never the base weights) with its metadata and card, staged and
published whole (`ia3_trainer.training.checkpoints`), and checkpoints written whole. The final save at the end of
training is a step of the run (`ia3_trainer.training.lifecycle`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

from ia3_trainer.hub.model_card import card_metrics, write_model_card
from ia3_trainer.jsonfiles import read_json, write_json, write_text
from ia3_trainer.layout import INFERENCE_FILE
from ia3_trainer.modeling.loading import saving_adapter_only


class SavingMixin:
    """The saving methods of [`IA3Seq2SeqTrainer`] (a `Seq2SeqTrainer`); they read `recipe`, `atomic_checkpoints`,
    `non_finite_guard` and `inference_settings()` from the trainer."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter (never the base weights), the tokenizer, `recipe.json` and `inference.json`.

        A base model built with `model.init: random` cannot be downloaded again, so the final save also keeps
        it in `output_dir/base-model` and points the adapter at it, so `AutoPeftModelForSeq2SeqLM` can load it.
        """
        output_dir = output_dir or self.args.output_dir
        if not _internal_call and self.recipe is not None and self.recipe.model.init == "random":
            base_dir = Path(output_dir) / "base-model"
            if self.args.should_save:
                # IA3 wraps each target as `k.base_layer` + `k.ia3_l`; saved as they are, those keys would not load
                # into a plain model (its k/v/wo would come back random), so save the plain names without IA3.
                base = self.model.get_base_model()
                state = {key.replace(".base_layer.", "."): value for key, value in base.state_dict().items()
                         if ".ia3_l." not in key}
                with self.atomic_checkpoints.staged(output_dir, "base-model") as staging:  # whole or not at all
                    with no_progress_bars():  # a "Writing model shards" bar for one small file says nothing
                        base.save_pretrained(staging / "base-model", state_dict=state)
                    self.processing_class.save_pretrained(staging / "base-model")
            self.model.peft_config[self.model.active_adapter].base_model_name_or_path = str(base_dir.resolve())
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:  # Trainer calls _save on every process; one writes per machine or run
            return super()._save(output_dir, state_dict)
        # Everything goes to a staging folder first and replaces the previous files only once written (a full disk
        # leaves the previous adapter and its metadata as they were); recipe.json, inference.json and the card last.
        with self.atomic_checkpoints.staged(output_dir or self.args.output_dir) as staging:
            with saving_adapter_only(self.model):
                super()._save(str(staging), state_dict)
            if self.recipe is not None:
                write_json(staging / "recipe.json", self.recipe.saved_dict())
            write_json(staging / INFERENCE_FILE, self.inference_settings())
            # Our card replaces the generic README.md that peft's save_pretrained just wrote: one card, the one a
            # push uploads (it writes this card again, for the repo pushed to).
            self.write_card(staging)

    def write_card(self, folder: str | Path) -> Path:
        """Write the model card (`README.md`) of the adapter in `folder`, with the metrics logged so far."""
        return write_model_card(folder, recipe=self.recipe.saved_dict() if self.recipe is not None else {},
                                metrics=card_metrics(self.state.log_history), tags=self._tag_names)

    def save_state(self) -> None:
        """Trainer's `save_state` (`trainer_state.json` in `output_dir`, on the main process), written whole or not
        at all: `ia3-trainer evaluate` draws its curves from it."""
        if self.is_world_process_zero():
            text = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"  # as Trainer writes it
            write_text(Path(self.args.output_dir) / "trainer_state.json", text)

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """Trainer's `save_metrics` (`{split}_results.json`, and `all_results.json` updated with `metrics`, on the
        main process), each file written whole or not at all: `ia3-trainer push` reads `all_results.json`."""
        if not self.is_world_process_zero():
            return
        folder = Path(self.args.output_dir)
        write_text(folder / f"{split}_results.json", json.dumps(metrics, indent=4, sort_keys=True))
        if combined:
            path = folder / "all_results.json"
            try:
                earlier = read_json(path, allow_nan=True) if path.is_file() else {}
            except (OSError, ValueError):  # the run's own file, unreadable: nothing in it to keep
                earlier = {}
            combined_metrics = {**(earlier if isinstance(earlier, dict) else {}), **metrics}
            write_text(path, json.dumps(combined_metrics, indent=4, sort_keys=True))

    def _save_checkpoint(self, model, trial) -> None:
        self.non_finite_guard.check()  # a "stop" run never writes a checkpoint after a non-finite step
        # transformers 5.24 writes checkpoint-N in place, so a crash mid-save leaves a folder that resuming takes
        # for whole; write it to tmp-checkpoint-N and rename it when every process is done (checkpoints.py).
        save = super()._save_checkpoint
        self.atomic_checkpoints.save(self, trial, lambda: save(model, trial))

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, Trainer's run folder is its staging folder (see _save_checkpoint).
        return self.atomic_checkpoints.staging_root or super()._get_output_dir(trial)


@contextlib.contextmanager
def no_progress_bars():
    """transformers' progress bars off for the block, as they were after it."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()
