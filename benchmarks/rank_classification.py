"""Rank classification with many labels: the prefix-tree scoring of `score_candidates` against the straightforward
one (`score_sequences`: every label's whole sequence decoded for every text), on the same encoder outputs.

The default is the case that took 483 s on a 2-core CPU: 2,000 labels (`c0` ... `c1999`, up to 6 tokens each) and
400 evaluation texts, in batches of 16, on the tiny T5 of `recipes/assets/tiny-t5` (random weights: speed does not
depend on what they learnt). Prints the seconds of each, their ratio, and how many texts get the same label both ways
(all of them, or the run fails) with the largest score difference.

    python benchmarks/rank_classification.py --threads 1
    python benchmarks/rank_classification.py --labels 200 --texts 64
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=2000)
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--model", default=str(REPO / "recipes" / "assets" / "tiny-t5"),
                        help="a seq2seq model folder or Hub id; its config is built with random weights")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    from ia3_trainer.modeling.scoring import candidate_label_ids, score_candidates, score_sequences

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(args.model)).eval()
    labels = [f"c{i}" for i in range(args.labels)]
    candidates = candidate_label_ids(tokenizer, labels)
    random.seed(0)
    words = "sales profit rose fell market shares quarter revenue company board said percent".split()
    texts = [" ".join(random.choices(words, k=10)) + f" item {i}" for i in range(args.texts)]

    seconds = {"straightforward": 0.0, "prefix tree": 0.0}
    same, largest = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(texts), args.batch_size):
            batch = tokenizer(texts[start:start + args.batch_size], return_tensors="pt", padding=True)
            hidden = model.get_encoder()(**batch).last_hidden_state
            began = time.perf_counter()
            old = score_sequences(model, hidden, batch["attention_mask"], candidates)
            seconds["straightforward"] += time.perf_counter() - began
            began = time.perf_counter()
            new = score_candidates(model, (hidden,), batch["attention_mask"], candidates)
            seconds["prefix tree"] += time.perf_counter() - began
            same += int((old.argmax(dim=-1) == new.argmax(dim=-1)).sum())
            largest = max(largest, float((old - new).abs().max()))
    result = {
        "labels": args.labels, "texts": args.texts, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "max_label_tokens": int((candidates != -100).sum(dim=1).max()),
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "speedup": round(seconds["straightforward"] / seconds["prefix tree"], 2),
        "same_prediction": f"{same}/{args.texts}", "max_score_difference": largest,
    }
    print(json.dumps(result, indent=2))
    return 0 if same == args.texts else 1


if __name__ == "__main__":
    sys.exit(main())
