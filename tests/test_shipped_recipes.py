"""Every recipe under recipes/ (subfolders too) validates, and its description says how to run it."""

import pytest

from ia3_trainer import load_recipe

from conftest import REPO


RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.json") if "assets" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").with_suffix("").as_posix())
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.description and "ia3-trainer train" in recipe.description
    assert path.stem in recipe.description or recipe.name in recipe.description
