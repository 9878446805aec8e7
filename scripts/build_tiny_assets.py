"""Regenerate the offline assets behind `recipes/tiny.json`.

The tiny recipe must train anywhere with no network, so the package ships a small synthetic sentiment dataset
(written from templates for this project, not taken from any corpus), a BPE tokenizer trained on it (whole words,
so labels are one token plus EOS), and the
config of a T5 small enough to train in seconds on a laptop CPU. Run from the repo root:

    python scripts/build_tiny_assets.py
"""

import json
import random
from pathlib import Path


ASSETS = Path(__file__).resolve().parent.parent / "recipes" / "assets"

COMPANIES = [
    "Acme Oyj", "Borealis Group", "Cobalt Systems", "Delta Foods", "Everline Bank", "Fjord Shipping", "Granite Works",
    "Helix Pharma", "Ironwood Paper", "Juniper Retail", "Kestrel Energy", "Lumen Telecom", "Meridian Steel",
    "Northwind Logistics", "Orion Media", "Polar Forest", "Quarry Metals", "Riverside Hotels", "Sable Software",
    "Tundra Mining",
]
METRICS = [
    "net sales", "operating profit", "net profit", "revenue", "order intake", "earnings per share",
    "gross margin", "cash flow", "market share", "operating margin",
]
PERIODS = ["in the first quarter", "in the second quarter", "in the third quarter", "in the fourth quarter",
           "in 2025", "for the full year", "in the January-June period", "last year"]
UP = ["rose", "increased", "grew", "climbed", "improved", "jumped", "surged"]
DOWN = ["fell", "decreased", "declined", "dropped", "weakened", "slumped", "shrank"]
NEUTRAL_TEMPLATES = [
    "{company} will publish its interim report on {day} .",
    "{company} is headquartered in {city} and employs about {n} people .",
    "The annual general meeting of {company} will be held in {city} .",
    "{company} operates {n} stores in {city} and nearby towns .",
    "{company} said the {metric} figures are reported according to IFRS .",
    "The board of {company} consists of {small} members .",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
CITIES = ["Helsinki", "Tampere", "Oulu", "Turku", "Stockholm", "Oslo", "Tallinn", "Riga"]


def make_sentence(rng: random.Random) -> dict:
    label = rng.choice(["positive", "negative", "neutral"])
    if label == "neutral":
        text = rng.choice(NEUTRAL_TEMPLATES).format(
            company=rng.choice(COMPANIES), day=rng.choice(DAYS), city=rng.choice(CITIES),
            n=rng.randint(20, 9000), small=rng.randint(3, 9), metric=rng.choice(METRICS),
        )
    else:
        verb = rng.choice(UP if label == "positive" else DOWN)
        text = (
            f"{rng.choice(COMPANIES)} said its {rng.choice(METRICS)} {verb} by {rng.randint(2, 60)} % "
            f"{rng.choice(PERIODS)} ."
        )
    return {"sentence": text, "label": label}


def build_dataset(path: Path, size: int = 600, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = [make_sentence(rng) for _ in range(size)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def build_tokenizer(folder: Path, texts: list[str], vocab_size: int = 512) -> int:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    wrapped.save_pretrained(folder)
    return len(wrapped)


def build_config(folder: Path, vocab_size: int) -> None:
    from transformers import T5Config

    config = T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    config.save_pretrained(folder)


def main() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    rows = build_dataset(ASSETS / "tiny-sentiment.jsonl")
    folder = ASSETS / "tiny-t5"
    texts = [row["sentence"] for row in rows] + ["positive", "negative", "neutral"] * 50
    vocab_size = build_tokenizer(folder, texts)
    build_config(folder, vocab_size)
    print(f"wrote {len(rows)} examples and a {vocab_size}-token tokenizer under {ASSETS}")


if __name__ == "__main__":
    main()
