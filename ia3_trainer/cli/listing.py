"""`ia3-trainer list` and `ia3-trainer list-architectures`."""

from __future__ import annotations

import json

from ia3_trainer.jsonfiles import read_json
from ia3_trainer.recipe.loading import list_shipped_recipes


def list_command() -> int:
    for name, path in list_shipped_recipes().items():
        description = read_json(path).get("description", "")
        print(f"{name:32} {description}")
    return 0


def list_architectures_command() -> int:
    from ia3_trainer.modeling.architectures import IA3_TARGETS, origin

    print(f"{'model_type':20} {'origin':13} target_modules / feedforward_modules")
    for model_type, (targets, feedforward) in sorted(IA3_TARGETS.items()):
        print(f"{model_type:20} {origin(model_type):13} {json.dumps(targets)} / {json.dumps(feedforward)}")
    return 0
