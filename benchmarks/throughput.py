"""Training throughput: the PEFT IA3 guide's loop vs a plain Seq2SeqTrainer vs IA3Seq2SeqTrainer.

All three train the same model (same initial weights), on the same examples, with the same hyperparameters (AdamW,
lr 8e-3, weight decay 0.01 as torch's AdamW default in the guide, linear schedule without warmup, batch 8), each
in its own subprocess of this one invocation, so the ratios compare like with like. Quality is then measured for
every variant by one shared evaluator (token-mean eval loss, generated-label accuracy, rank accuracy).

    python benchmarks/throughput.py                       # small T5 from config on the real Financial PhraseBank
    python benchmarks/throughput.py --device cuda --model google/flan-t5-base --train-size 2000

Variants:
  guide  the task guide's loop: pad every source to 128 tokens, fp32, DataLoader(shuffle), AdamW, linear schedule;
         evaluated by its own teacher-forced argmax accuracy.
  plain  Seq2SeqTrainer + get_peft_model + DataCollatorForSeq2Seq with library defaults.
  ia3    IA3Seq2SeqTrainer.from_recipe with the same hyperparameters and nothing else set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
PHRASEBANK = REPO.parent / "shared" / "data" / "financial_phrasebank" / "Sentences_AllAgree.txt"
TINY_DATA = REPO / "recipes" / "assets" / "tiny-sentiment.jsonl"
LABELS = ["negative", "neutral", "positive"]
VARIANTS = ("guide", "plain", "ia3")
# One of the trainer's speed defaults changed at a time, to show what each brings. On a CPU without native bf16,
# "ia3" already is fp32 and pads to the longest sequence.
ABLATIONS = {
    "ia3 random order": {"training": {"train_sampling_strategy": "random"}},
    "ia3 fp32": {"training": {"bf16": False}},
    "ia3 bf16 no pad to 8": {"training": {"bf16": True}, "pad_to_multiple_of": 1},
}


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
    if args.model:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        AutoTokenizer.from_pretrained(args.model).save_pretrained(model_dir)
        AutoModelForSeq2SeqLM.from_pretrained(args.model).save_pretrained(model_dir)
        description = args.model
    else:
        vocab = train_tokenizer([row["sentence"] for row in train] + LABELS, model_dir, args.vocab_size)
        from transformers import T5Config, T5ForConditionalGeneration, set_seed

        set_seed(args.seed)
        config = T5Config(vocab_size=vocab, d_model=args.d_model, d_kv=args.d_model // 4, d_ff=args.d_model * 4,
                          num_layers=args.layers, num_decoder_layers=args.layers, num_heads=4, pad_token_id=0,
                          eos_token_id=1, decoder_start_token_id=0)
        T5ForConditionalGeneration(config).save_pretrained(model_dir)
        description = f"T5 from config (d_model {args.d_model}, {args.layers}+{args.layers} layers, vocab {vocab})"
    return {"model_dir": str(model_dir), "model": description, "train": len(train), "eval": len(evaluation),
            "data": str(args.data or (PHRASEBANK if PHRASEBANK.is_file() else TINY_DATA))}


def train_tokenizer(texts: list[str], folder: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>")
    # Whole-word label tokens, as mt0's vocabulary has them: labels are 2 tokens with EOS and fit max length 3.
    wrapped.add_tokens(LABELS)
    wrapped.save_pretrained(folder)
    return len(wrapped)


# --- measurement helpers (child process) --------------------------------------------------------------------------


class PeakMemory:
    """Peak memory in use above the level at start: the CUDA allocator's peak on GPU; on CPU, live malloc bytes.

    On CPU, RSS would show glibc's high-water mark (freed blocks stay in its arenas), so a thread samples
    glibc's `mallinfo2()` (bytes in use in all arenas plus mmapped blocks) every 2 ms instead; without glibc it
    falls back to RSS.
    """

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.read = _live_heap_reader()
            self.start = self.peak = self.read()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()
        self.mib = (self.peak - self.start) / 2**20


def _live_heap_reader():
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        import psutil

        process = psutil.Process()
        return lambda: process.memory_info().rss
    mallinfo2.restype = MallInfo2

    def read() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return read


class PaddingCounter:
    """Wraps a collate function and counts padded positions in inputs and labels of the batches it makes."""

    def __init__(self, collate, pad_token_id: int):
        self.collate, self.pad_token_id = collate, pad_token_id
        self.padded = self.total = 0

    def __call__(self, features):
        batch = self.collate(features)
        mask = batch["attention_mask"]
        self.padded += int((mask == 0).sum()) + int((batch["labels"] == -100).sum())
        self.total += mask.numel() + batch["labels"].numel()
        return batch

    @property
    def fraction(self) -> float:
        return self.padded / max(self.total, 1)


def shared_evaluation(model, tokenizer, eval_file: str, device: str) -> dict:
    """One evaluator for every variant: token-mean loss, generated-label accuracy, rank accuracy."""
    import torch
    from datasets import load_dataset
    from transformers import DataCollatorForSeq2Seq

    from ia3_trainer.metrics import decode
    from ia3_trainer.ranking import candidate_label_ids, score_candidates

    rows = load_dataset("json", data_files=eval_file, split="train")
    collate = DataCollatorForSeq2Seq(tokenizer, model=model)
    candidates = candidate_label_ids(tokenizer, LABELS)
    longest = int((candidates != -100).sum(dim=1).max())
    model.eval()
    nll = tokens = generated_ok = ranked_ok = 0
    for start in range(0, len(rows), 32):
        chunk = rows[start: start + 32]
        features = [{**tokenizer(text, max_length=128, truncation=True),
                     "labels": tokenizer(text_target=label)["input_ids"]}
                    for text, label in zip(chunk["sentence"], chunk["label"], strict=True)]
        batch = {k: v.to(device) for k, v in collate(features).items()}
        with torch.no_grad():
            logits = model(**batch).logits
            loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"],
                                                     ignore_index=-100, reduction="sum")
            nll += loss.item()
            tokens += int((batch["labels"] != -100).sum())
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=longest)
            encoded = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            ranks = score_candidates(model, encoded, batch["attention_mask"], candidates).argmax(-1).tolist()
        generated_ok += sum(p == g for p, g in zip(decode(generated.cpu(), tokenizer), chunk["label"], strict=True))
        ranked_ok += sum(LABELS[r] == g for r, g in zip(ranks, chunk["label"], strict=True))
    return {"eval_loss": nll / tokens, "label_accuracy": generated_ok / len(rows),
            "rank_accuracy": ranked_ok / len(rows)}


# --- the three variants (child process) ---------------------------------------------------------------------------


def run_guide(cfg: dict) -> dict:
    """The task guide's loop, kept as written there (padding="max_length", fp32, manual AdamW + linear schedule)."""
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
    counter = PaddingCounter(default_data_collator, tokenizer.pad_token_id)
    train_dataloader = DataLoader(processed["train"], shuffle=True, collate_fn=counter, batch_size=8,
                                  pin_memory=device == "cuda")
    eval_dataloader = DataLoader(processed["validation"], collate_fn=default_data_collator, batch_size=8,
                                 pin_memory=device == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    lr_scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0,
                                                   num_training_steps=len(train_dataloader) * cfg["epochs"])
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        for _ in range(cfg["epochs"]):
            model.train()
            for batch in train_dataloader:
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model.eval()
    eval_preds = []
    for batch in eval_dataloader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            outputs = model(**batch)
        eval_preds.extend(tokenizer.batch_decode(torch.argmax(outputs.logits, -1).cpu().numpy(),
                                                 skip_special_tokens=True))
    eval_seconds = time.perf_counter() - started
    gold = data["validation"]["label"]
    teacher_forced = sum(p.strip() == g.strip() for p, g in zip(eval_preds, gold, strict=True)) / len(gold)
    return {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "peak_mib": memory.mib,
            "padded_fraction": counter.fraction, "teacher_forced_accuracy": teacher_forced,
            **shared_evaluation(model, tokenizer, cfg["eval_file"], device)}


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
    counter = PaddingCounter(DataCollatorForSeq2Seq(tokenizer, model=model), tokenizer.pad_token_id)
    args = Seq2SeqTrainingArguments(
        output_dir=cfg["work"] + "/plain", learning_rate=cfg["lr"], per_device_train_batch_size=8,
        per_device_eval_batch_size=8, num_train_epochs=cfg["epochs"], weight_decay=0.01, seed=cfg["seed"],
        save_strategy="no", logging_steps=10_000, report_to="none", use_cpu=cfg["device"] == "cpu",
        disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=processed["train"],
                             eval_dataset=processed["validation"], data_collator=counter, processing_class=tokenizer)
    return _train_and_evaluate(trainer, counter, cfg)


def run_ia3(cfg: dict) -> dict:
    """IA3Seq2SeqTrainer.from_recipe with the guide's hyperparameters and nothing else."""
    from ia3_trainer import IA3Seq2SeqTrainer

    recipe = {
        "name": "bench",
        "model": {"name_or_path": cfg["model_dir"]},
        "data": {"path": "json", "data_files": {"train": cfg["train_file"], "validation": cfg["eval_file"]},
                 "validation_split": "validation", "label_names": LABELS,
                 "max_source_length": 128, "max_target_length": 3},
        "training": {"output_dir": cfg["work"] + "/ia3", "learning_rate": cfg["lr"], "num_train_epochs": cfg["epochs"],
                     "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "weight_decay": 0.01,
                     "seed": cfg["seed"], "save_strategy": "no", "logging_steps": 10_000,
                     "use_cpu": cfg["device"] == "cpu", "save_final_adapter": False, "disable_tqdm": True,
                     **cfg.get("training", {})},
    }
    trainer = IA3Seq2SeqTrainer.from_recipe(recipe)
    if cfg.get("pad_to_multiple_of"):
        from ia3_trainer.data import build_collator

        trainer.data_collator = build_collator(trainer.processing_class, trainer.model, cfg["pad_to_multiple_of"])
    counter = PaddingCounter(trainer.data_collator, trainer.processing_class.pad_token_id)
    trainer.data_collator = counter
    return _train_and_evaluate(trainer, counter, cfg)


def _train_and_evaluate(trainer, counter, cfg) -> dict:
    import torch

    with PeakMemory(cfg["device"]) as memory:
        started = time.perf_counter()
        trainer.train()
        if cfg["device"] == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    own = trainer.evaluate()
    eval_seconds = time.perf_counter() - started
    result = {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "peak_mib": memory.mib,
              "padded_fraction": counter.fraction, "own_eval": own}
    return {**result, **shared_evaluation(trainer.model, trainer.processing_class, cfg["eval_file"], cfg["device"])}


# --- driver -------------------------------------------------------------------------------------------------------


def table(results: dict, setup: dict, epochs: int) -> str:
    base = results.get("guide")
    lines = [
        f"model: {setup['model']}; data: {setup['train']} train / {setup['eval']} eval examples of {setup['data']}; "
        f"{epochs} epoch(s), batch 8, lr {setup['lr']}",
        "",
        "| variant | train samples/s | vs guide | padded tokens | peak memory in training (MiB) | eval loss "
        "| vs guide "
        "| label acc (generated) | rank acc | eval time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        speed = setup["train"] * epochs / r["train_seconds"]
        base_speed = setup["train"] * epochs / base["train_seconds"] if base else None
        lines.append(
            f"| {name} | {speed:.1f} | {speed / base_speed:.2f}x | {r['padded_fraction']:.1%} | {r['peak_mib']:.0f} | "
            f"{r['eval_loss']:.4f} | {r['eval_loss'] / base['eval_loss'] - 1:+.1%} | {r['label_accuracy']:.3f} | "
            f"{r['rank_accuracy']:.3f} | {r['eval_seconds']:.2f} |"
            if base else f"| {name} | {speed:.1f} | - | {r['padded_fraction']:.1%} | {r['peak_mib']:.0f} | "
            f"{r['eval_loss']:.4f} | - | {r['label_accuracy']:.3f} | {r['rank_accuracy']:.3f} | "
            f"{r['eval_seconds']:.2f} |"
        )
    if base:
        lines.append("")
        lines.append(f"guide's own teacher-forced argmax accuracy: {base['teacher_forced_accuracy']:.3f} "
                     "(not a label accuracy: the argmax sees the gold previous token)")
    if "ia3" in results and "plain" in results and base:
        ia3, plain = results["ia3"], results["plain"]
        checks = [
            ("ia3 samples/s vs guide", base["train_seconds"] / ia3["train_seconds"], ">= 3x", lambda v: v >= 3),
            ("ia3 samples/s vs plain", plain["train_seconds"] / ia3["train_seconds"], ">= 1.5x", lambda v: v >= 1.5),
            ("ia3 eval loss vs guide", ia3["eval_loss"] / base["eval_loss"] - 1, "<= +2%", lambda v: v <= 0.02),
            ("ia3 peak memory vs guide", ia3["peak_mib"] / max(base["peak_mib"], 1e-9), "<= 1x", lambda v: v <= 1),
        ]
        lines.append("")
        for label, value, target, ok in checks:
            shown = f"{value:+.1%}" if "loss" in label else f"{value:.2f}x"
            lines.append(f"{label}: {shown} (goal {target}): {'met' if ok(value) else 'NOT met'}")
        own = ia3["own_eval"]
        if "eval_generate_runtime" in own:
            lines.append(f"ia3 evaluation: label accuracy by generation {own['eval_label_accuracy']:.3f} in "
                         f"{own['eval_generate_runtime']:.2f} s, by rank classification "
                         f"{own.get('eval_rank_accuracy', float('nan')):.3f} in "
                         f"{own.get('eval_rank_runtime', 0):.2f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hub id or local seq2seq model instead of the small T5 from config")
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
    parser.add_argument("--no-ablations", action="store_true", help="skip the rows that switch one ia3 default")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "throughput.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one variant, in its own process, config as JSON
        cfg = json.loads(args.child)
        result = {"guide": run_guide, "plain": run_plain}.get(cfg["variant"], run_ia3)(cfg)
        print("RESULT " + json.dumps(result, default=float))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup = prepare(args, work)
        setup["lr"] = args.lr
        results = {}
        variants = args.variants.split(",")
        if not args.no_ablations and "ia3" in variants:
            variants += list(ABLATIONS)
        for variant in variants:
            cfg = {"variant": variant, "model_dir": setup["model_dir"], "train_file": str(work / "train.jsonl"),
                   "eval_file": str(work / "eval.jsonl"), "work": str(work), "epochs": args.epochs, "lr": args.lr,
                   "seed": args.seed, "device": args.device, **ABLATIONS.get(variant, {})}
            env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True,
                                  text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results[variant] = json.loads(lines[-1][len("RESULT "):])
            print(f"{variant}: {results[variant]['train_seconds']:.1f} s training", file=sys.stderr)
    print(table(results, setup, args.epochs))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"setup": setup, "args": {k: str(v) for k, v in vars(args).items()},
                                     "results": results}, indent=2))
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
