"""Rank classification with many labels: `rank_candidates` (what an evaluation runs: a branch-and-bound walk of the
labels' prefix tree) and `score_candidates` (every label's score, along the prefix tree) against the straightforward
scoring (`score_sequences`: every label's whole sequence decoded for every text, what the package did before), on
the same encoder outputs, in one invocation.

The default is the case of issue #19 (483 s of rank classification on a 2-core CPU): 2,000 labels (`c0` ...
`c1999`, up to 6 tokens each) and 400 evaluation texts, in batches of 16, on the tiny T5 of
`recipes/assets/tiny-t5` (random weights; how much the branch and bound leaves out depends on how sure the model
is: a trained adapter leaves out more). The timings:

- `straightforward, torch's threads`: the old scoring as an evaluation ran it then (torch's default thread count);
- `straightforward`, `prefix tree` and `branch and bound`, each on 1 thread: the kernels' own speed-ups;
- `branch and bound, package's threads`: as an evaluation runs it now (`modeling.threads.cpu_threads`: one thread
  for a model this small unless the user chose a number).

It prints the seconds, the ratios, how many texts get the same label from the old scoring and from the branch and
bound (all of them, or it exits 1), and the largest difference between the old scores and the prefix tree's.

    python benchmarks/rank_classification.py
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
    parser.add_argument("--model", default=str(REPO / "recipes" / "assets" / "tiny-t5"),
                        help="a seq2seq model folder or Hub id; its config is built with random weights")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    from ia3_trainer.modeling.scoring import candidate_label_ids, rank_candidates, score_candidates, score_sequences
    from ia3_trainer.modeling.threads import cpu_threads

    torch_threads = torch.get_num_threads()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(args.model)).eval()
    labels = [f"c{i}" for i in range(args.labels)]
    candidates = candidate_label_ids(tokenizer, labels)
    random.seed(0)
    words = "sales profit rose fell market shares quarter revenue company board said percent".split()
    texts = [" ".join(random.choices(words, k=10)) + f" item {i}" for i in range(args.texts)]

    def timed(name, threads, function, *arguments):
        torch.set_num_threads(threads)
        began = time.perf_counter()
        result = function(*arguments)
        seconds[name] += time.perf_counter() - began
        return result

    def now(hidden, mask):
        with cpu_threads(model, torch.device("cpu")):
            package_threads.add(torch.get_num_threads())
            return rank_candidates(model, (hidden,), mask, candidates)

    names = ("straightforward, torch's threads", "straightforward, 1 thread", "prefix tree, 1 thread",
             "branch and bound, 1 thread", "branch and bound, package's threads")
    seconds = dict.fromkeys(names, 0.0)
    package_threads: set[int] = set()
    same, largest = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(texts), args.batch_size):
            batch = tokenizer(texts[start:start + args.batch_size], return_tensors="pt", padding=True)
            hidden = model.get_encoder()(**batch).last_hidden_state
            mask = batch["attention_mask"]
            old = timed(names[0], torch_threads, score_sequences, model, hidden, mask, candidates)
            timed(names[1], 1, score_sequences, model, hidden, mask, candidates)
            tree = timed(names[2], 1, score_candidates, model, (hidden,), mask, candidates)
            timed(names[3], 1, rank_candidates, model, (hidden,), mask, candidates)
            new = timed(names[4], torch_threads, now, hidden, mask)
            same += int((old.argmax(dim=-1) == new).sum())
            largest = max(largest, float((old - tree).abs().max()))
    torch.set_num_threads(torch_threads)
    result = {
        "labels": args.labels, "texts": args.texts, "batch_size": args.batch_size,
        "threads": {"torch's default": torch_threads, "package's choice": sorted(package_threads)},
        "max_label_tokens": int((candidates != -100).sum(dim=1).max()),
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "speedup": {
            "prefix tree, 1 thread each": round(seconds[names[1]] / seconds[names[2]], 2),
            "branch and bound, 1 thread each": round(seconds[names[1]] / seconds[names[3]], 2),
            "as an evaluation runs it, now vs before": round(seconds[names[0]] / seconds[names[4]], 2),
        },
        "same_prediction": f"{same}/{args.texts}", "max_score_difference": largest,
    }
    print(json.dumps(result, indent=2))
    return 0 if same == args.texts else 1


if __name__ == "__main__":
    sys.exit(main())
