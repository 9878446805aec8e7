"""Write `ia3_trainer/recipe/field_types.json`: the keys and types of the `ia3` and `training` sections, read off
`peft.IA3Config` and `IA3TrainingArguments`, so that checking a recipe imports neither (`recipe/field_types.py`).

Run it from the repo root after changing `IA3TrainingArguments`' fields or the pinned peft or transformers:

    python scripts/store_field_types.py
"""

from ia3_trainer.recipe.field_types import store_field_types


if __name__ == "__main__":
    print(f"wrote {store_field_types()}")
