"""Training throughput and the whole job: the PEFT IA3 guide's loop vs a plain Seq2SeqTrainer vs IA3Seq2SeqTrainer.

Every variant trains the same model (same initial weights) on the same examples with the same hyperparameters
(AdamW, lr 8e-3, weight decay 0.01, linear schedule without warmup, batch 8) for `--epochs` epochs with an evaluation
after each epoch, each in its own subprocess of this one invocation, so the ratios compare like with like:

    python benchmarks/throughput.py                                  # CPU: a small T5 from config, real PhraseBank
    python benchmarks/throughput.py --shape mt0-large --device cuda  # issue #10's table: mt0-large's exact shape
    python benchmarks/throughput.py --shape mt0-large --device cuda --train-size 2037   # the guide's whole job

Variants:
  guide  the task guide's loop: pad every source to 128 tokens, fp32, DataLoader(shuffle), AdamW, linear schedule,
         and its per-epoch evaluation (eval loss and teacher-forced argmax).
  plain  Seq2SeqTrainer + get_peft_model + DataCollatorForSeq2Seq with library defaults, eval_strategy "epoch".
  ia3    IA3Seq2SeqTrainer.from_recipe with the same hyperparameters, eval_strategy "epoch", nothing else set.
  More rows change one ia3 default at a time.

Reported per variant: training samples/s and tokens/s (non-padding tokens), the wall-clock of the whole job (model
load and warm-up, training and every evaluation), peak memory, dispatched aten ops per training step (counted with a
TorchDispatchMode in a separate short run: the figure `--ops-only` prints alone) and, on CUDA, kernel launches per
step (the host's launch calls in torch.profiler; a CUDA graph replay counts once). Quality comes from one evaluator
for every variant: `IA3Predictor.score`, the package's own evaluation kernel (eval loss, generated-label accuracy,
rank accuracy).

`--shape mt0-large` builds random weights in bigscience/mt0-large's exact shape (1.23 B parameters, separate lm_head)
with the tokenizer in `--tokenizer` (default ../shared/gpu/tok); `mt0-large-thin` keeps its 24+24 layers at width 64:
the same ops a step, for CPUs. Quality numbers on random weights mean nothing; speed, memory and equality between
variants do.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import PaddingCounter, PeakMemory, count_step_ops, train_tokenizer  # noqa: E402


PHRASEBANK = REPO.parent / "shared" / "data" / "financial_phrasebank" / "Sentences_AllAgree.txt"
SHARED_TOKENIZER = REPO.parent / "shared" / "gpu" / "tok"
TINY_DATA = REPO / "recipes" / "assets" / "tiny-sentiment.jsonl"
LABELS = ["negative", "neutral", "positive"]
VARIANTS = ("guide", "plain", "ia3")
# One ia3 default changed at a time. "ia3 bf16"/"ia3 fp32": whichever the default is not, on this device.
ABLATIONS = {
    "ia3 random order": {"train_sampling_strategy": "random"},
    "ia3 unfused": {"fused_kernels": False},
    "ia3 fused": {"fused_kernels": True},
    "ia3 bf16": {"bf16": True},
    "ia3 fp32": {"bf16": False},
    "ia3 compile_blocks": {"compile_blocks": True},
}
MT0_LARGE = dict(d_ff=2816, d_kv=64, d_model=1024, decoder_start_token_id=0, dense_act_fn="gelu_new", dropout_rate=0.1,
                 eos_token_id=1, feed_forward_proj="gated-gelu", is_encoder_decoder=True, layer_norm_epsilon=1e-06,
                 num_decoder_layers=24, num_heads=16, num_layers=24, pad_token_id=0,
                 relative_attention_max_distance=128, relative_attention_num_buckets=32, tie_word_embeddings=False,
                 vocab_size=250112)
SHAPES = {"mt0-large": MT0_LARGE, "mt0-large-thin": {**MT0_LARGE, "d_ff": 128, "d_model": 64, "d_kv": 16,
                                                     "num_heads": 4, "vocab_size": 8000}}


# --- set-up (parent process) -------------------------------------------------------------------------------------


def load_examples(path: Path | None) -> list[dict]:
    if path is None:
        path = PHRASEBANK if PHRASEBANK.is_file() else TINY_DATA
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = path.read_text(encoding="latin-1").splitlines()
    pairs = [line.rsplit("@", 1) for line in lines if "@" in line]
    return [{"sentence": text.strip(), "label": label.strip()} for text, label in pairs]


def prepare(args, work: Path) -> dict:
    """Write the train/eval files, a tokenizer and the initial model that every variant starts from."""
    examples = load_examples(args.data)
    random.Random(args.seed).shuffle(examples)
    train, evaluation = examples[: args.train_size], examples[args.train_size: args.train_size + args.eval_size]
    for name, rows in (("train", train), ("eval", evaluation)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    model_dir = work / "model"
    import torch
    from transformers import AutoTokenizer, set_seed

    set_seed(args.seed)
    if args.model:
        from transformers import AutoModelForSeq2SeqLM

        AutoTokenizer.from_pretrained(args.model).save_pretrained(model_dir)
        AutoModelForSeq2SeqLM.from_pretrained(args.model).save_pretrained(model_dir)
        description = args.model
    elif args.shape in SHAPES:
        from transformers import MT5Config, MT5ForConditionalGeneration

        tokenizer_dir = args.tokenizer or SHARED_TOKENIZER
        if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            tokenizer_dir = work / "tok"
            train_tokenizer([row["sentence"] for row in examples] + LABELS, tokenizer_dir, 8000)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
        with torch.device(args.device):  # mt0-large builds in seconds on a GPU, minutes on a CPU
            model = MT5ForConditionalGeneration(MT5Config(**SHAPES[args.shape]))
            # transformers 5 ties mT5's head to the embeddings when it builds one; mt0's checkpoint has its own head.
            if model.lm_head.weight is model.shared.weight:
                scale = model.config.d_model**-0.5
                model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * scale)
        model.config.tie_word_embeddings = False
        model.save_pretrained(model_dir)
        size = sum(p.numel() for p in model.parameters())
        description = f"{args.shape} shape, random weights ({size:,} parameters), tokenizer {tokenizer_dir}"
        del model
    else:
        vocab = train_tokenizer([row["sentence"] for row in train] + LABELS, model_dir, args.vocab_size)
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(vocab_size=vocab, d_model=args.d_model, d_kv=args.d_model // 4, d_ff=args.d_model * 4,
                          num_layers=args.layers, num_decoder_layers=args.layers, num_heads=4, pad_token_id=0,
                          eos_token_id=1, decoder_start_token_id=0)
        T5ForConditionalGeneration(config).save_pretrained(model_dir)
        description = f"T5 from config (d_model {args.d_model}, {args.layers}+{args.layers} layers, vocab {vocab})"
    return {"model_dir": str(model_dir), "model": description, "train": len(train), "eval": len(evaluation),
            "data": str(args.data or (PHRASEBANK if PHRASEBANK.is_file() else TINY_DATA))}


# --- evaluation: one evaluator for every variant, the package's own kernel (child process) ------------------------


def shared_evaluation(model, tokenizer, eval_file: str) -> dict:
    """Eval loss, generated-label accuracy and rank accuracy through `IA3Predictor.score`
    (ia3_trainer.modeling.scoring)."""
    from datasets import load_dataset

    from ia3_trainer import IA3Predictor
    from ia3_trainer.data.encoding import encode_batch, tokenize
    from ia3_trainer.evaluation.metrics import eval_metrics
    from ia3_trainer.recipe.loading import DataSection

    data = DataSection(path="json", max_source_length=128, max_target_length=3, label_names=LABELS)
    dataset = tokenize(load_dataset("json", data_files=eval_file, split="train"), tokenizer, data, encode_batch)
    predictor = IA3Predictor(model, tokenizer, data=data,
                             inference={"label_names": LABELS, "encode": "default"})
    outputs = predictor.score(dataset, batch_size=32)
    metrics = eval_metrics(outputs, ["label_accuracy", "rank_accuracy"], tokenizer, LABELS)
    return {"eval_loss": outputs.loss, **metrics}


# --- the variants (child process) ---------------------------------------------------------------------------------


def run_guide(cfg: dict) -> dict:
    """The task guide's loop, as written there (padding="max_length", fp32, AdamW + linear schedule), with its
    per-epoch evaluation (eval loss and teacher-forced argmax)."""
    import torch
    from datasets import load_dataset
    from peft import IA3Config, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        default_data_collator,
        get_linear_schedule_with_warmup,
        set_seed,
    )

    started = time.perf_counter()
    set_seed(cfg["seed"])
    device = cfg["device"]
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(cfg["model_dir"]),
                           IA3Config(task_type="SEQ_2_SEQ_LM")).to(device)
    data = load_dataset("json", data_files={"train": cfg["train_file"], "validation": cfg["eval_file"]})

    def preprocess_function(examples):
        model_inputs = tokenizer(examples["sentence"], max_length=128, padding="max_length", truncation=True,
                                 return_tensors="pt")
        labels = tokenizer(examples["label"], max_length=3, padding="max_length", truncation=True,
                           return_tensors="pt")["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        model_inputs["labels"] = labels
        return model_inputs

    processed = data.map(preprocess_function, batched=True, remove_columns=data["train"].column_names)
    counter = PaddingCounter(default_data_collator)
    train_dataloader = DataLoader(processed["train"], shuffle=True, collate_fn=counter, batch_size=8,
                                  pin_memory=device == "cuda")
    eval_dataloader = DataLoader(processed["validation"], collate_fn=default_data_collator, batch_size=8,
                                 pin_memory=device == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    lr_scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0,
                                                   num_training_steps=len(train_dataloader) * cfg["epochs"])

    def step(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    if cfg.get("count_ops"):
        model.train()
        return count_step_ops(step, iter(train_dataloader), device)
    train_seconds = eval_seconds = 0.0
    with PeakMemory(device) as memory:
        for _ in range(cfg["epochs"]):
            epoch_start = time.perf_counter()
            model.train()
            for batch in train_dataloader:
                step(batch)
            _sync(device)
            train_seconds += time.perf_counter() - epoch_start
            eval_start = time.perf_counter()
            model.eval()
            eval_loss, eval_preds = 0.0, []
            for batch in eval_dataloader:
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.no_grad():
                    outputs = model(**batch)
                eval_loss += outputs.loss.detach().float()
                eval_preds.extend(tokenizer.batch_decode(torch.argmax(outputs.logits, -1).cpu().numpy(),
                                                         skip_special_tokens=True))
            eval_seconds += time.perf_counter() - eval_start
    job_seconds = time.perf_counter() - started
    gold = data["validation"]["label"]
    teacher_forced = sum(p.strip() == g.strip() for p, g in zip(eval_preds, gold, strict=True)) / len(gold)
    return {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "job_seconds": job_seconds,
            "peak_mib": memory.mib, "tokens": counter.tokens, "padded_fraction": counter.fraction,
            "teacher_forced_accuracy": teacher_forced, **shared_evaluation(model, tokenizer, cfg["eval_file"])}


def run_plain(cfg: dict) -> dict:
    """What a user writes by hand today: Seq2SeqTrainer + get_peft_model, everything else left at its default."""
    from datasets import load_dataset
    from peft import IA3Config, get_peft_model
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        set_seed,
    )

    started = time.perf_counter()
    set_seed(cfg["seed"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    base = AutoModelForSeq2SeqLM.from_pretrained(cfg["model_dir"])
    model = get_peft_model(base, IA3Config(task_type="SEQ_2_SEQ_LM"))
    data = load_dataset("json", data_files={"train": cfg["train_file"], "validation": cfg["eval_file"]})

    def preprocess(batch):
        inputs = tokenizer(batch["sentence"], max_length=128, truncation=True)
        inputs["labels"] = tokenizer(text_target=batch["label"], max_length=3, truncation=True)["input_ids"]
        return inputs

    processed = data.map(preprocess, batched=True, remove_columns=data["train"].column_names)
    counter = PaddingCounter(DataCollatorForSeq2Seq(tokenizer, model=model))
    args = Seq2SeqTrainingArguments(
        output_dir=cfg["work"] + "/plain", learning_rate=cfg["lr"], per_device_train_batch_size=8,
        per_device_eval_batch_size=8, num_train_epochs=cfg["epochs"], weight_decay=0.01, seed=cfg["seed"],
        save_strategy="no", eval_strategy="epoch", logging_steps=10_000, report_to="none",
        use_cpu=cfg["device"] == "cpu", disable_tqdm=True, **({"max_steps": 4} if cfg.get("count_ops") else {}),
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=processed["train"],
                             eval_dataset=processed["validation"], data_collator=counter, processing_class=tokenizer)
    return _train(trainer, counter, cfg, started)


def run_ia3(cfg: dict) -> dict:
    """IA3Seq2SeqTrainer.from_recipe with the guide's hyperparameters and nothing else (plus one ablation)."""
    from ia3_trainer import IA3Seq2SeqTrainer

    started = time.perf_counter()
    recipe = {
        "name": "bench",
        "model": {"name_or_path": cfg["model_dir"]},
        "data": {"path": "json", "data_files": {"train": cfg["train_file"], "validation": cfg["eval_file"]},
                 "validation_split": "validation", "label_names": LABELS, "max_source_length": 128,
                 "max_target_length": 3},
        "training": {"output_dir": cfg["work"] + "/ia3-" + cfg["variant"].replace(" ", "-")
                     + ("-ops" if cfg.get("count_ops") else ""),
                     "learning_rate": cfg["lr"], "num_train_epochs": cfg["epochs"],
                     "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "weight_decay": 0.01,
                     "seed": cfg["seed"], "save_strategy": "no", "eval_strategy": "epoch", "logging_steps": 10_000,
                     "use_cpu": cfg["device"] == "cpu", "save_final_adapter": False, "disable_tqdm": True,
                     **({"max_steps": 4} if cfg.get("count_ops") else {}), **ABLATIONS.get(cfg["variant"], {})},
    }
    trainer = IA3Seq2SeqTrainer.from_recipe(recipe)
    counter = PaddingCounter(trainer.data_collator)
    trainer.data_collator = counter
    result = _train(trainer, counter, cfg, started)
    return {**result, "bf16": trainer.args.bf16}


def _train(trainer, counter, cfg, started) -> dict:
    if cfg.get("count_ops"):
        return count_step_ops(trainer, None, cfg["device"])
    eval_seconds = []
    evaluate = trainer.evaluate

    def timed_evaluate(*args, **kwargs):
        _sync(cfg["device"])
        begin = time.perf_counter()
        try:
            return evaluate(*args, **kwargs)
        finally:
            eval_seconds.append(time.perf_counter() - begin)

    trainer.evaluate = timed_evaluate
    with PeakMemory(cfg["device"]) as memory:
        output = trainer.train()
        _sync(cfg["device"])
        # Trainer's own clock of its loop: the run's results and report written after it are not training time.
        loop_seconds = output.metrics["train_runtime"]
    job_seconds = time.perf_counter() - started
    result = {"train_seconds": loop_seconds - sum(eval_seconds), "eval_seconds": sum(eval_seconds),
              "job_seconds": job_seconds, "peak_mib": memory.mib, "tokens": counter.tokens,
              "padded_fraction": counter.fraction}
    return {**result, **shared_evaluation(trainer.model, trainer.processing_class, cfg["eval_file"])}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# --- driver -------------------------------------------------------------------------------------------------------


def table(results: dict, setup: dict, args) -> str:
    base = results.get("guide")
    lines = [
        f"model: {setup['model']}; data: {setup['train']} train / {setup['eval']} eval examples of {setup['data']}; "
        f"{args.epochs} epoch(s) with an evaluation after each, batch 8, lr {args.lr}; device: {setup['device']}",
        "",
        "| variant | train samples/s | vs guide | tokens/s | whole job (s) | job vs guide | ops/step | kernels/step "
        "| padded | peak MiB | eval loss | vs guide | label acc | rank acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        speed = setup["train"] * args.epochs / r["train_seconds"]
        base_speed = setup["train"] * args.epochs / base["train_seconds"] if base else float("nan")
        ratio = lambda value, ref: f"{value / ref:.2f}x" if base else "-"  # noqa: E731
        lines.append(
            f"| {name} | {speed:.1f} | {ratio(speed, base_speed)} | {r['tokens'] / r['train_seconds']:.0f} | "
            f"{r['job_seconds']:.1f} | {ratio(base['job_seconds'], r['job_seconds']) if base else '-'} | "
            f"{r.get('ops_per_step', float('nan')):.0f} | {r.get('kernels_per_step', '-')} | "
            f"{r['padded_fraction']:.1%} | {r['peak_mib']:.0f} | {r['eval_loss']:.4f} | "
            f"{(r['eval_loss'] / base['eval_loss'] - 1) if base else float('nan'):+.1%} | "
            f"{r['label_accuracy']:.3f} | {r['rank_accuracy']:.3f} |"
        )
    if base:
        lines += ["", f"guide's own teacher-forced argmax accuracy: {base['teacher_forced_accuracy']:.3f} (not a "
                  "label accuracy: the argmax sees the gold previous token)"]
    if "ia3" in results and "plain" in results and base:
        ia3, plain = results["ia3"], results["plain"]
        gpu = setup["device"] == "cuda"
        speed, over_plain = base["train_seconds"] / ia3["train_seconds"], plain["train_seconds"] / ia3["train_seconds"]
        checks = [
            ("ia3 samples/s vs guide", speed, ">= 5x" if gpu else ">= 3x", speed >= (5 if gpu else 3)),
            ("ia3 samples/s vs plain", over_plain, ">= 4x" if gpu else ">= 1.5x", over_plain >= (4 if gpu else 1.5)),
            ("ia3 whole job vs guide", base["job_seconds"] / ia3["job_seconds"], ">= 3x",
             base["job_seconds"] / ia3["job_seconds"] >= 3),
            ("ia3 eval loss vs guide", ia3["eval_loss"] / base["eval_loss"] - 1, "within 2%",
             abs(ia3["eval_loss"] / base["eval_loss"] - 1) <= 0.02),
            ("ia3 peak memory vs guide", ia3["peak_mib"] / max(base["peak_mib"], 1e-9), "<= 1x",
             ia3["peak_mib"] <= base["peak_mib"]),
            ("ia3 ops/step vs plain", ia3.get("ops_per_step", 0) / max(plain.get("ops_per_step", 1), 1), "< 1x",
             ia3.get("ops_per_step", 0) < plain.get("ops_per_step", 0)),
        ]
        lines.append("")
        for label, value, target, met in checks:
            shown = f"{value:+.1%}" if "loss" in label else f"{value:.2f}x"
            lines.append(f"{label}: {shown} (goal {target}): {'met' if met else 'NOT met'}")
        lines.append(f"ia3 ran in {'bf16' if ia3.get('bf16') else 'fp32'} (its default on this device)")
    return "\n".join(lines)


def run_child(cfg: dict, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          env=env, cwd=work)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{cfg['variant']} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["t5-config", *SHAPES], default="t5-config",
                        help="the model: a small T5 from config (default), or mt0-large's shape with random weights")
    parser.add_argument("--model", help="a Hub id or local seq2seq model instead of --shape")
    parser.add_argument("--tokenizer", type=Path, help=f"tokenizer for the mt0 shapes (default: {SHARED_TOKENIZER})")
    parser.add_argument("--data", type=Path, help="sentence@label file or jsonl (default: the real PhraseBank)")
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--eval-size", type=int, default=227)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=8e-3)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of guide,plain,ia3")
    parser.add_argument("--ablations", default="auto",
                        help="comma-separated ablation rows, 'none', or 'auto' (each default flipped; compile_blocks "
                             "on CUDA only)")
    parser.add_argument("--ops-only", action="store_true",
                        help="only count dispatched ops per training step (the figure CI tracks; default shape "
                             "mt0-large-thin, guide / plain / ia3 in fp32 and bf16, no compile)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "throughput.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one variant, in its own process, config as JSON
        cfg = json.loads(args.child)
        runner = {"guide": run_guide, "plain": run_plain}.get(cfg["variant"], run_ia3)
        print("RESULT " + json.dumps(runner(cfg), default=float))
        return 0

    if args.ops_only:
        return ops_table(args)
    variants = args.variants.split(",")
    if "ia3" in variants and args.ablations != "none":
        if args.ablations == "auto":
            from ia3_trainer import IA3TrainingArguments

            defaults = IA3TrainingArguments(output_dir="x", use_cpu=args.device == "cpu")
            variants += ["ia3 random order", "ia3 unfused" if defaults.fused_kernels else "ia3 fused",
                         "ia3 fp32" if defaults.bf16 else "ia3 bf16"]
            variants += ["ia3 compile_blocks"] if args.device == "cuda" else []
        else:
            variants += [name for name in args.ablations.split(",") if name]
    setup, results = run_variants(args, variants, timed=True)
    print(table(results, setup, args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"setup": setup, "args": {k: str(v) for k, v in vars(args).items()},
                                     "results": results}, indent=2))
    print(f"\nresults written to {args.json}")
    return 0


def run_variants(args, variants: list[str], timed: bool) -> tuple[dict, dict]:
    """Prepare the model and data once, then run each variant in its own process: the timed job (`timed`), and a
    short run counting its dispatched ops (and kernel launches on CUDA) per training step."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup = {**prepare(args, work), "device": _device_name(args.device)}
        results = {}
        for variant in variants:
            cfg = {"variant": variant, "model_dir": setup["model_dir"], "train_file": str(work / "train.jsonl"),
                   "eval_file": str(work / "eval.jsonl"), "work": str(work), "epochs": args.epochs, "lr": args.lr,
                   "seed": args.seed, "device": args.device}
            results[variant] = run_child(cfg, work) if timed else {}
            results[variant].update(run_child({**cfg, "count_ops": True}, work))
            if timed:
                print(f"{variant}: {results[variant]['job_seconds']:.1f} s whole job", file=sys.stderr)
    return setup, results


def ops_table(args) -> int:
    """Dispatched aten ops per training step for guide, plain and ia3 (fp32 and bf16; no compile): a figure that
    does not depend on the machine's speed, for the dispatch-bound regime of a fast GPU."""
    if args.shape == "t5-config" and not args.model:
        args.shape = "mt0-large-thin"
    args.train_size, args.eval_size = min(args.train_size, 64), min(args.eval_size, 8)
    variants = ["guide", "plain", "ia3 fp32", "ia3 bf16"]
    setup, results = run_variants(args, variants, timed=False)
    plain = results["plain"]["ops_per_step"]
    lines = [f"model: {setup['model']}; batch 8; device: {setup['device']}", "",
             "| variant | ops/step | vs plain | most frequent |", "|---|---|---|---|"]
    for name, result in results.items():
        top = ", ".join(f"{op.removeprefix('aten.')} {n:.0f}" for op, n in list(result["top_ops"].items())[:5])
        lines.append(f"| {name} | {result['ops_per_step']:.0f} | {result['ops_per_step'] / plain:.2f}x | {top} |")
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"setup": setup, "results": results}, indent=2))
    return 0


def _device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


if __name__ == "__main__":
    sys.exit(main())
