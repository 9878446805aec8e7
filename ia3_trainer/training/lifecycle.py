"""The run of an [`IA3Seq2SeqTrainer`], from its output folder to its results, whichever door it came in by.

`IA3Seq2SeqTrainer.train()` runs [`run`]: claim `output_dir` once (`ia3_trainer.training.runs`) -> train -> save the
final adapter; then, for a trainer built from a recipe (`from_recipe`, the command line, each sweep trial), the last
evaluation -> results (`trainer_state.json`, `all_results.json`), report and plots, card -> the final Hub push ->
a bounded wait for the pushes. A trainer built by hand stops after the final save, as Trainer's `train()` does.

Each step is the trainer's own public method or a function of the module that owns it; this module only orders
them and returns what they made ([`RunOutput`]). Printing is left to the caller (`on_results`), except the lines
of the wait for the Hub, which say what is waited for while it is waited for.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from transformers.trainer_utils import TrainOutput

from ia3_trainer.data.fingerprint import data_fingerprint
from ia3_trainer.evaluation.report import build_report, write_report
from ia3_trainer.training.checkpoints import last_checkpoint
from ia3_trainer.training.runs import claim_output_dir, no_checkpoint_error


logger = logging.getLogger(__name__)


class RunOutput(TrainOutput):
    """What `train()` returns: Trainer's `TrainOutput` (`global_step`, `training_loss`, `metrics`), where a run from
    a recipe adds the last evaluation's `eval_*` metrics to `metrics` (as in `all_results.json`), and:

    Attributes:
        output_dir (`Path`): the run's folder.
        evaluation ([`~ia3_trainer.evaluation.loop.Evaluation`] or `None`): the last evaluation, the report's source.
        report (`dict` or `None`): what `eval_report.json` holds (main process only).
        report_paths (`list[Path]`): `eval_report.json`, then the plots written (main process only).
        final_commits (`list[str]`): URL of the commit of the final adapter, one per Hub repo pushed to.
        push_failures (`list[str]`): one line per push that failed or was not waited for.
    """

    output_dir: Path | None = None
    evaluation = None
    report: dict | None = None
    report_paths: list[Path] = ()  # lists on each output `run` returns
    final_commits: list[str] = ()
    push_failures: list[str] = ()


class RunCompleteInterrupt(KeyboardInterrupt):
    """Ctrl-C after training ended (and the final adapter was saved, when the run saves one): the run is complete
    and needs no resume; only its results, report or pushes may be missing."""

    def __init__(self, output_dir: Path, adapter_saved: bool):
        super().__init__()
        self.output_dir, self.adapter_saved = output_dir, adapter_saved


def run(trainer, train, resume_from_checkpoint: str | bool | None = None, on_results=None) -> RunOutput:
    """Run `trainer` from its folder to its results (see the module docstring); `train(resume_from_checkpoint)` is
    Trainer's own `train`. `resume_from_checkpoint` is `True` (the newest whole checkpoint of `output_dir`), a
    checkpoint path, or None/False for a fresh run; for a run from a recipe None takes the recipe's
    `training.resume_from_checkpoint`. `on_results(output)` is called on the main process once the results, report
    and card are written, before the wait for the Hub (the command line prints its summary there)."""
    args, recipe = trainer.args, trainer.recipe
    if recipe is not None and resume_from_checkpoint is None:
        resume_from_checkpoint = args.resume_from_checkpoint
    resume_from_checkpoint = resume_from_checkpoint or None
    overwrite = getattr(args, "overwrite_output_dir", False)
    recipe_dict = recipe.to_dict() if recipe is not None else None
    with claim_output_dir(args, recipe_dict, resume=resume_from_checkpoint, overwrite=overwrite) as folder:
        if resume_from_checkpoint is True:  # the newest whole checkpoint every process has
            resume_from_checkpoint = last_checkpoint(args.output_dir, trainer.accelerator)
            if resume_from_checkpoint is None:
                raise no_checkpoint_error(args.output_dir)
        if resume_from_checkpoint:
            logger.info("Resuming from %s", resume_from_checkpoint)
            if trainer.is_world_process_zero():
                print(f"Resuming from {resume_from_checkpoint}")
        folder.begin(args, data=lambda: data_fingerprint(trainer.train_dataset, trainer.eval_dataset,
                                                          trainer.candidate_labels, recipe_dict))
        trained = train(resume_from_checkpoint)
        # Trainer returns its own train_loss, before log() left the steps the non-finite guard skipped out of it.
        output = RunOutput(trained.global_step, trained.metrics.get("train_loss", trained.training_loss),
                           trained.metrics)
        output.output_dir = Path(args.output_dir)
        output.report_paths, output.final_commits, output.push_failures = [], [], []
        trainer.non_finite_guard.check()  # a "stop" run saves no adapter after a non-finite step
        saved = bool(getattr(args, "save_final_adapter", False))
        if saved:
            trainer.save_model()  # every process takes part (sharded models gather the IA3 vectors)
        try:  # the adapter is saved: an interrupt from here on leaves a complete run
            if recipe is not None:
                write_results(trainer, output, card=saved)
                if on_results is not None and trainer.is_world_process_zero():
                    on_results(output)
            from ia3_trainer.hub.callback import PushAdapterToHubCallback

            pushes = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PushAdapterToHubCallback)]
            for callback in pushes:
                if saved and not callback.save_final:  # it leaves the final save to the trainer, and is told
                    callback.push_final_adapter(args.output_dir, trainer.state)
            if recipe is not None and trainer.is_world_process_zero():
                wait_for_pushes(pushes, output)
        except KeyboardInterrupt as interrupt:
            if str(interrupt):  # the wait for the Hub says what it stopped
                raise
            raise RunCompleteInterrupt(output.output_dir, saved) from None
    return output


def write_results(trainer, output: RunOutput, card: bool = True) -> None:
    """The last evaluation (the one made at the last step when there was one: nothing is evaluated twice), then, on
    the main process, `trainer_state.json`, `all_results.json`, the report with its plots and, with `card`, the
    model card again with the final metrics. Fills in `output`."""
    if trainer.eval_dataset is not None:
        output.evaluation = trainer.final_evaluation()  # every process takes part
        output.metrics.update(output.evaluation.eval_results())
    if not trainer.is_world_process_zero():
        return
    trainer.save_state()  # `ia3-trainer evaluate` draws its curves from it
    trainer.save_metrics("all", output.metrics)  # `ia3-trainer push` reads all_results.json
    evaluation = output.evaluation
    if evaluation is not None and evaluation.outputs.labels is not None:
        output.report = build_report(evaluation.outputs, trainer.processing_class, trainer.candidate_labels,
                                     adapter=str(output.output_dir), data="validation split of the recipe",
                                     step=evaluation.step)
        output.report_paths = write_report(output.report, output.output_dir, trainer.state.log_history)
    if card:
        trainer.write_card(output.output_dir)  # the evaluation above may have logged after the final save


def wait_for_pushes(callbacks, output: RunOutput | None = None) -> None:
    """Wait, bounded and saying so, for the pushes `callbacks` (each a [`PushAdapterToHubCallback`]) still run in
    the background; then print the commit of the final adapter, or the line saying what did not reach the Hub.
    Ctrl-C stops the wait and the pushes: it raises `KeyboardInterrupt` with that line as its message."""
    for callback in callbacks:
        line = None
        try:
            if callback.pending:
                print(f"ia3-trainer: waiting up to {callback.wait_limit:g} s for Hub repo {callback.repo_id}: "
                      f"{'; '.join(callback.pending)} (Ctrl-C stops waiting)", flush=True)
                if not callback.wait(timeout=callback.wait_limit):
                    line = callback.cancel(f"Stopped waiting after {callback.wait_limit:g} s")
        except KeyboardInterrupt:
            raise KeyboardInterrupt(callback.cancel("Interrupted") or "interrupted") from None
        if output is not None:
            output.push_failures.extend(callback.failures)
            output.final_commits.extend(filter(None, [callback.final_commit]))
        if line:
            print(f"ia3-trainer: {line}", file=sys.stderr)
        elif callback.final_commit:
            print(f"Pushed the adapter to {callback.final_commit}")

