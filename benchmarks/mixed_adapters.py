"""Several adapters in one batch: one mixed stream vs one pass per adapter, on the same base model.

Four IA3 adapters with random vectors (no training: speed does not depend on what the vectors learnt), each with
its own recipe (source prefix, source limit, label set) and generation bound, are saved the way training saves them
(`adapter_config.json`, weights, tokenizer, `recipe.json`, `inference.json`) and loaded onto one base model by one
`IA3Predictor`. 256 texts per adapter are then labelled twice:

  separate  for each adapter in turn: `set_adapter(name)` and `predict(its 256 texts)` (what serving several tasks
            takes without mixed batches: requests grouped by adapter)
  mixed     all 1024 texts in one shuffled stream, `predict(texts, adapter=names)`

in two settings:

  own bounds  each adapter generates up to its own bound (2, 3, 10 and 6 tokens). `predict` batches the stream in
              order of bound, so most batches hold one adapter; random vectors never emit EOS, so each batch runs to
              the longest bound in it.
  one bound   `max_new_tokens` is the same for all, so the stream keeps its order and every batch mixes all four
              adapters: the cost of the per-row scaling itself.

Each cell is samples/s (best of `--repeats`, the variants alternating), with the count of texts whose predictions are
the same both ways.

    python benchmarks/mixed_adapters.py --threads 1                            # small T5 from config, CPU
    python benchmarks/mixed_adapters.py --device cuda --model google/flan-t5-base --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # a source checkout runs its own package

TINY_DATA = REPO / "recipes" / "assets" / "tiny-sentiment.jsonl"
TOKENIZER = REPO / "recipes" / "assets" / "tiny-t5"
# One task per adapter: prefix, source limit, label set; the generation bound follows from the labels.
TASKS = [
    ("sentiment", 64, ["negative", "neutral", "positive"]),
    ("mood", 48, ["bad", "meh", "good"]),
    ("news", 96, ["bad news today", "nothing new", "good news"]),
    ("trend", 128, ["down", "flat", "up", "sideways"]),
]


def build_base(args, work: Path) -> tuple[str, object]:
    """The base model's name (a Hub id or a saved folder) and its tokenizer."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration, set_seed

    if args.model:
        return args.model, AutoTokenizer.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    set_seed(args.seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=args.d_model, d_kv=args.d_model // 8, d_ff=4 * args.d_model,
                      num_layers=args.layers, num_decoder_layers=args.layers, num_heads=8, dropout_rate=0.0,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    return str(work / "base"), tokenizer


def save_adapters(args, base_name: str, tokenizer, work: Path) -> list[Path]:
    """Four adapters with random vectors around 1, each with the recipe and inference settings training writes."""
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(base_name)
    folders = []
    for index, (task, max_source_length, labels) in enumerate(TASKS):
        model = get_peft_model(base, IA3Config(task_type="SEQ_2_SEQ_LM"))
        generator = torch.Generator().manual_seed(args.seed + index)
        with torch.no_grad():
            for name, vector in model.named_parameters():
                if "ia3_l" in name:
                    vector.copy_(1 + 0.3 * torch.randn(vector.shape, generator=generator))
        folder = work / task
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        bound = max(len(ids) for ids in tokenizer(text_target=labels)["input_ids"])
        recipe = {"model": {"name_or_path": base_name, "dtype": args.dtype},
                  "data": {"path": "json", "text_column": "sentence", "label_column": "label",
                           "source_prefix": f"{task}: ", "max_source_length": max_source_length,
                           "max_target_length": bound, "label_names": labels}}
        (folder / "recipe.json").write_text(json.dumps(recipe, indent=2))
        (folder / "inference.json").write_text(json.dumps({"label_names": labels, "max_new_tokens": bound,
                                                           "encode": "default"}))
        base = model.unload()  # the same base for the next adapter
        folders.append(folder)
    return folders


def best_of(repeats: int, runs: dict) -> dict:
    """For each named run (a function of no arguments): its best time over `repeats` calls and its result. The runs
    alternate, so that load from other processes falls on all of them alike."""
    best = {name: (float("inf"), None) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            result = run()
            best[name] = (min(best[name][0], time.perf_counter() - started), result)
    return best


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads "
            f"(torch {torch.__version__})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hub id or local T5-family model instead of the small T5 from config")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the base weights (model.dtype of the adapters' recipes)")
    parser.add_argument("--texts-per-adapter", type=int, default=256)
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one-bound", type=int, default=10, help="max_new_tokens of the 'one bound' rows")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from ia3_trainer.inference.predictor import IA3Predictor

    sentences = [json.loads(line)["sentence"] for line in TINY_DATA.read_text().splitlines() if line.strip()]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_name, tokenizer = build_base(args, work)
        folders = save_adapters(args, base_name, tokenizer, work)
        predictor = IA3Predictor.from_pretrained(folders[0], adapter_name=TASKS[0][0], device=args.device)
        for (task, _, _), folder in zip(TASKS[1:], folders[1:], strict=True):
            predictor.load_adapter(folder, task)

        per_task = {task: rng.sample(sentences, args.texts_per_adapter) for task, _, _ in TASKS}
        stream = [(task, i) for task in per_task for i in range(args.texts_per_adapter)]
        rng.shuffle(stream)
        names, texts = [task for task, _ in stream], [per_task[task][i] for task, i in stream]

        def separate(**kwargs):  # one pass per adapter; predictions put back in the order of the stream
            alone = {}
            for task, task_texts in per_task.items():
                predictor.set_adapter(task)
                alone[task] = predictor.predict(task_texts, progress=False, **kwargs)
            return [alone[task][i] for task, i in stream]

        rows = []
        for batch_size in [int(size) for size in args.batch_sizes.split(",")]:
            for setting, bound in (("own bounds", None), ("one bound", args.one_bound)):
                kwargs = {"batch_size": batch_size, "max_new_tokens": bound}
                predictor.predict(texts[:batch_size], adapter=names[:batch_size], progress=False, **kwargs)  # warm-up
                best = best_of(args.repeats, {
                    "mixed": partial(predictor.predict, texts, adapter=names, progress=False, **kwargs),
                    "separate": partial(separate, **kwargs),
                })
                (mixed_seconds, mixed), (separate_seconds, alone) = best["mixed"], best["separate"]
                same = sum(a == b for a, b in zip(mixed, alone, strict=True))
                rows.append((batch_size, setting, len(texts) / separate_seconds, len(texts) / mixed_seconds, same))

    print(f"base: {args.model or f'T5 from config, d_model {args.d_model}, {args.layers}+{args.layers} layers'} "
          f"({args.dtype}); {len(TASKS)} adapters x {args.texts_per_adapter} texts; {machine(args.device)}")
    print()
    print("| batch size | generation | separate (samples/s) | mixed (samples/s) | mixed / separate "
          "| identical predictions |")
    print("|---|---|---|---|---|---|")
    for batch_size, setting, separate_speed, mixed_speed, same in rows:
        print(f"| {batch_size} | {setting} | {separate_speed:.1f} | {mixed_speed:.1f} | "
              f"{mixed_speed / separate_speed:.2f}x | {same}/{len(texts)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
