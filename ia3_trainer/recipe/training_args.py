"""`IA3TrainingArguments`: `Seq2SeqTrainingArguments` plus the few settings this package adds."""

import os
from dataclasses import dataclass, field
from typing import Literal

from transformers import Seq2SeqTrainingArguments
from transformers.training_args import trainer_log_levels

from ia3_trainer.errors import RecipeError


@dataclass
class IA3TrainingArguments(Seq2SeqTrainingArguments):
    """[`~transformers.Seq2SeqTrainingArguments`] for [`IA3Seq2SeqTrainer`]. Every field of the parent works as
    documented there; a recipe's `training` section feeds this class.

    > Parameters that control what is saved

    overwrite_output_dir (`bool`, *optional*, defaults to `False`):
        Let a fresh run replace another run in `output_dir`: the files a run writes (adapter, checkpoints, tokenizer,
        metadata, results; `ia3_trainer.training.runs.RUN_FILES`) are removed first and other files are kept. Without
        it a fresh run needs a new or empty folder. (transformers 5 removed the parent's field of this name; the
        command line's `--overwrite` does the same for one run.)
    save_final_adapter (`bool`, *optional*, defaults to `True`):
        Save the adapter, tokenizer and `recipe.json` to `output_dir` when `train()` finishes, so a run from a
        recipe leaves a usable adapter without a separate `save_model()` call.

    > Parameters that control failures

    non_finite_loss (`str`, *optional*, defaults to `"stop"`):
        What a `nan` or `inf` training loss does: `stop` raises an error naming the step before the optimizer
        applies it, so the last checkpoint stays good; `skip` drops that batch's gradients, logs a warning and
        goes on (not with DeepSpeed, which keeps gradients in its own buffers).

    > Parameters that control speed

    fused_kernels (`bool`, *optional*, defaults to `True`):
        Swap T5's RMS norm and `gelu_new` for torch's fused `rms_norm` and `gelu(approximate="tanh")` (the same
        functions, fewer kernels; `ia3_trainer.modeling.kernels`). Parameters and saved files do not change. On CUDA
        each is one kernel instead of about 6 forward and 15 backward (not yet measured on a GPU); on a CPU `rms_norm`
        runs the same ops, `gelu_new` takes 2.1x less time fused, and whole training runs were within noise of each
        other.
    compile_blocks (`bool`, *optional*, defaults to `False`):
        Compile the repeated block (e.g. `T5Block`) once with `torch.compile` and reuse it for every layer, in
        training only; on CUDA with `mode="reduce-overhead"`, so each block replays a CUDA graph instead of
        launching its kernels one by one. Compiling takes time at the first steps and for each new padded length
        (batches are padded to a multiple of 16 then); a failed compile falls back to eager with a warning. Not
        measured on a GPU yet: off by default.

    > Parameters that control evaluation

    rank_classification (`bool`, *optional*, defaults to `True`):
        When the label set is known (`data.label_names`, ClassLabel names, or a small set of text labels), also
        score every candidate label with one decoder pass and report `eval_rank_accuracy` (T-Few's rank
        classification) next to the generated `eval_label_accuracy`.

    > Parameters that differ from the parent's defaults

    predict_with_generate (`bool`, *optional*, defaults to `True`):
        Evaluation generates the label text (free-running), which label accuracy needs. Teacher-forced argmax
        is not a label accuracy: it copies the gold label from the decoder input.
    train_sampling_strategy (`str`, *optional*, defaults to `"group_by_length"`):
        Batches of similar source lengths, so dynamic padding pads little (`benchmarks/throughput.py`). The order
        is still random between groups; set `"random"` for the parent's sampler.
    bf16 (`bool`, *optional*, defaults to `None`):
        `None` decides by measurement per device. On a CPU with AVX512-BF16 or AMX (with `use_cpu: true`:
        transformers allows CPU bf16 only then) bf16 is on: 1.14x the samples/s of fp32 in `benchmarks/throughput.py`
        there, with the frozen base stored in bf16, the IA3 vectors in fp32, and batches padded to a multiple of 8
        (that bounds the shapes whose kernels oneDNN caches: without it peak memory grew 2.5x). On CUDA it is off:
        at the guide's batch size mt0-large is bound by kernel dispatch, not arithmetic, and bf16 only adds casts
        (measured on an H200: fp32 31.7 samples/s, bf16 23.4, issue #10); with `compile_blocks` (CUDA graphs take the
        dispatch away, so arithmetic counts again) it is on where the GPU supports it, not yet measured. Elsewhere
        bf16 is emulated and slower than fp32, so it stays off.
    logging_nan_inf_filter (`bool`, *optional*, defaults to `False`):
        Trainer's filter reads every step's loss back to the host, which stalls a GPU; `non_finite_loss` keeps
        non-finite losses out of the weights and out of the logged means without it.
    disable_tqdm (`bool`, *optional*, defaults to `None`):
        `None` turns the progress bars off when stderr is not a terminal (redirected to a log file, each bar
        update is a carriage-return line: hundreds a run) and the logs are printed as lines instead; on a
        terminal it follows the parent's rule (off only when the log level is above warning).
    log_level_replica (`str`, *optional*, defaults to `"passive"`):
        transformers' log level on the processes of a launch that do not log (not local rank 0): kept as it is. The
        command line sets it to `error` there before transformers loads (`ia3_trainer.processes`), so a warning
        prints once per machine; the parent's `"warning"` would set it back when the trainer starts.
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Let a fresh run replace another run's files in output_dir (else it needs a new or empty "
                          "folder)."},
    )
    save_final_adapter: bool = field(
        default=True,
        metadata={"help": "Save the adapter, tokenizer and recipe.json to output_dir when train() finishes."},
    )
    non_finite_loss: Literal["stop", "skip"] = field(
        default="stop",
        metadata={"help": "On a nan/inf training loss: stop with an error naming the step, or skip the batch."},
    )
    rank_classification: bool = field(
        default=True,
        metadata={"help": "Also report eval_rank_accuracy: the most likely of the known labels (a branch-and-bound "
                          "walk of their prefix tree)."},
    )
    fused_kernels: bool = field(
        default=True, metadata={"help": "Swap T5's RMS norm and gelu_new for torch's fused equivalents."}
    )
    compile_blocks: bool = field(
        default=False,
        metadata={"help": "Compile the repeated block once (CUDA graphs on CUDA), in training only."},
    )
    predict_with_generate: bool = field(
        default=True, metadata={"help": "Generate the label text in evaluation (needed for label accuracy)."}
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "Batches of similar lengths (less padding); 'random' for the parent's sampler."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision; None = by measurement: on for CPUs with native bf16, off on CUDA "
                          "unless compile_blocks."},
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Trainer's per-step nan check, a host read every step; the non-finite guard replaces it."},
    )
    disable_tqdm: bool | None = field(
        default=None,
        metadata={"help": "Disable tqdm progress bars; None = off when stderr is not a terminal (a log file), else "
                          "the parent's rule (off when the log level is above warning)."},
    )
    log_level_replica: str = field(
        default="passive",
        metadata={"help": "transformers' log level on the processes that do not log; 'passive' keeps it (the command "
                          "line sets error there).", "choices": trainer_log_levels.keys()},
    )

    def __post_init__(self):
        check_launcher_environment()  # accelerate reads these with int() while the parent sets up the device
        # Resolved before the parent's checks, which need a bool.
        if self.bf16 is None:
            self.bf16 = not self.fp16 and default_bf16(self.use_cpu, self.compile_blocks)
        if self.disable_tqdm is None and not stderr_is_terminal():
            self.disable_tqdm = True
        if self.dataloader_pin_memory and not uses_accelerator(self.use_cpu):
            self.dataloader_pin_memory = False  # else torch warns for every dataloader that nothing is pinned
        super().__post_init__()


# What launchers (accelerate launch, torchrun, SLURM scripts) set for every process, each a whole number.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def check_launcher_environment() -> None:
    """A `RecipeError` naming the environment variable when a launcher's variable is set to no whole number."""
    for name in LAUNCHER_VARIABLES:
        value = os.environ.get(name)
        if value is not None and not value.strip().lstrip("-").isdigit():
            raise RecipeError(
                f"{name}: the environment variable is {value!r}, not a whole number; unset it (`unset {name}`) to "
                "train in one process, or start the run with accelerate launch or torchrun, which set it"
            )


def stderr_is_terminal() -> bool:
    """Progress bars draw on stderr: a terminal redraws them in place, a file keeps every redraw."""
    import sys

    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def uses_accelerator(use_cpu: bool) -> bool:
    """Whether training runs on an accelerator (CUDA, MPS, XPU, ...): pinned memory only helps copies to one."""
    import torch

    return not use_cpu and torch.accelerator.is_available()


def default_bf16(use_cpu: bool, compile_blocks: bool = False) -> bool:
    """The measured default of `bf16` (see the class docstring): on for CPUs with native bf16, off on CUDA unless the
    repeated blocks are compiled (CUDA graphs)."""
    import torch

    if not use_cpu:  # transformers accepts CPU bf16 only with use_cpu=True
        return compile_blocks and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def pad_multiple(args) -> int | None:
    """Pad to a multiple of 16 with compiled blocks (each new length is a new graph to compile and capture), else of
    8 on GPU (tensor cores) and under bf16 (CPU: bounds the shapes oneDNN caches kernels for); fp32 on CPU pads to the
    longest sequence only, as a multiple adds work there (benchmarks/throughput.py)."""
    if getattr(args, "compile_blocks", False):
        return 16
    return 8 if args.device.type == "cuda" or args.bf16 else None
