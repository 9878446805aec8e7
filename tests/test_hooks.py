"""Extension points: from_recipe runs documented hooks in one order; overriding one changes only its step; a
subclass can declare its own recipe sections, checked like the built-in ones."""

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from peft import IA3Config
from transformers import TrainerCallback

from ia3_trainer import IA3Seq2SeqTrainer, Recipe, RecipeError, apply_overrides, load_recipe
from ia3_trainer.data.encoding import encode_batch

from conftest import tiny_recipe


HOOK_ORDER = ["load_tokenizer", "load_datasets", "preprocess", "build_compute_metrics", "load_model",
              "build_ia3_config", "build_callbacks"]


def ia3_modules(trainer):
    return sorted({name.split(".")[-1] for name, module in trainer.model.named_modules() if hasattr(module, "ia3_l")})


@pytest.fixture
def no_datasets_cache():
    """A cached `map` would skip `preprocess`; these tests must see every call."""
    import datasets

    datasets.disable_caching()
    yield
    datasets.enable_caching()


def test_from_recipe_runs_the_hooks_in_the_documented_order(tmp_path, no_datasets_cache):
    calls = []

    def record(name):
        if name not in calls:
            calls.append(name)

    class Recording(IA3Seq2SeqTrainer):
        @classmethod
        def load_tokenizer(cls, recipe):
            assert isinstance(recipe, Recipe)  # every hook receives the whole recipe
            record("load_tokenizer")
            return super().load_tokenizer(recipe)

        @classmethod
        def load_datasets(cls, recipe, tokenizer):
            record("load_datasets")
            return super().load_datasets(recipe, tokenizer)

        @classmethod
        def preprocess(cls, batch, tokenizer, data):
            record("preprocess")
            return super().preprocess(batch, tokenizer, data)

        @classmethod
        def build_compute_metrics(cls, recipe, tokenizer, candidate_labels):
            record("build_compute_metrics")
            return super().build_compute_metrics(recipe, tokenizer, candidate_labels)

        @classmethod
        def load_model(cls, recipe, seed=42):
            assert isinstance(recipe, Recipe)
            record("load_model")
            return super().load_model(recipe, seed=seed)

        @classmethod
        def build_ia3_config(cls, recipe, model):
            record("build_ia3_config")
            return super().build_ia3_config(recipe, model)

        @classmethod
        def build_callbacks(cls, recipe):
            record("build_callbacks")
            return super().build_callbacks(recipe)

    Recording.from_recipe(tiny_recipe(tmp_path, **{"data.max_train_samples": 8}))
    assert calls == HOOK_ORDER


def test_overriding_build_ia3_config_changes_only_the_adapter(tmp_path):
    class QueryValue(IA3Seq2SeqTrainer):
        @classmethod
        def build_ia3_config(cls, recipe, model):
            assert model.config.model_type == "t5"  # the hook sees the loaded model, to choose per architecture
            return IA3Config(target_modules=["q", "v"], feedforward_modules=[])

    raw = tiny_recipe(tmp_path, **{"data.max_train_samples": 16})
    base, custom = IA3Seq2SeqTrainer.from_recipe(raw), QueryValue.from_recipe(raw)
    assert ia3_modules(base) == ["k", "v", "wo"]
    assert ia3_modules(custom) == ["q", "v"]
    assert custom.train_dataset["input_ids"] == base.train_dataset["input_ids"]
    assert custom.eval_dataset["labels"] == base.eval_dataset["labels"]
    assert custom.candidate_labels == base.candidate_labels == ["negative", "neutral", "positive"]
    assert custom.args.learning_rate == base.args.learning_rate
    assert custom.recipe.to_dict() == base.recipe.to_dict()


def test_overriding_preprocess_changes_only_the_model_inputs(tmp_path, tokenizer):
    class Prompted(IA3Seq2SeqTrainer):
        @classmethod
        def preprocess(cls, batch, tokenizer, data):
            return encode_batch(batch, tokenizer, dataclasses.replace(data, source_prefix="review: "))

    raw = tiny_recipe(tmp_path, **{"data.max_train_samples": 16})
    base, custom = IA3Seq2SeqTrainer.from_recipe(raw), Prompted.from_recipe(raw)
    prefix = tokenizer("review:", add_special_tokens=False)["input_ids"]
    for plain, prompted in zip(base.train_dataset["input_ids"], custom.train_dataset["input_ids"], strict=True):
        assert prompted[: len(prefix)] == prefix and prompted != plain
    assert custom.train_dataset["labels"] == base.train_dataset["labels"]
    assert ia3_modules(custom) == ia3_modules(base)


def test_overriding_metrics_and_callbacks(tmp_path):
    ended = []

    class Ended(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            ended.append(state.global_step)

    class Custom(IA3Seq2SeqTrainer):
        @classmethod
        def build_compute_metrics(cls, recipe, tokenizer, candidate_labels):
            assert super().build_compute_metrics(recipe, tokenizer, candidate_labels) is None

            def compute_metrics(eval_prediction):  # a plain Trainer compute_metrics: generated ids and labels
                assert eval_prediction.predictions.shape[0] == eval_prediction.label_ids.shape[0]
                texts = tokenizer.batch_decode(np.where(eval_prediction.predictions == -100, 0,
                                                        eval_prediction.predictions), skip_special_tokens=True)
                return {"num_examples": len(eval_prediction.label_ids), "texts": len(texts)}

            return compute_metrics

        @classmethod
        def build_callbacks(cls, recipe):
            return [*super().build_callbacks(recipe), Ended()]

    trainer = Custom.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 2}))
    trainer.train()
    assert ended == [2]
    metrics = trainer.evaluate()
    assert metrics["eval_num_examples"] == metrics["eval_texts"] == 24
    assert {"eval_perplexity", "eval_label_accuracy"} <= set(metrics)


def test_build_callbacks_adds_the_hub_callback_only_with_a_repo(tmp_path):
    assert IA3Seq2SeqTrainer.build_callbacks(load_recipe(tiny_recipe(tmp_path))) == []
    recipe = load_recipe(tiny_recipe(tmp_path, **{"hub.repo_id": "alice/tiny-ia3", "hub.strategy": "epoch"}))
    (callback,) = IA3Seq2SeqTrainer.build_callbacks(recipe)
    assert (type(callback).__name__, callback.repo_id, callback.strategy) == ("PushAdapterToHubCallback",
                                                                             "alice/tiny-ia3", "epoch")


# --- custom recipe sections ----------------------------------------------------------------------------------------


@dataclass
class Prompt:
    template: str = field(default="{text}", metadata={"help": "Prompt around the source; must contain {text}."})
    repeats: int = field(default=1, metadata={"help": "How many times to repeat the prompt."})

    def __post_init__(self):
        if "{text}" not in self.template:
            raise ValueError(f"template: must contain {{text}}, got {self.template!r}")


@dataclass
class Needed:
    level: int = field(metadata={"help": "A required field."})


def test_declared_section_is_checked_and_readable(tmp_path):
    raw = {**tiny_recipe(tmp_path), "prompt": {"template": "Review: {text}", "repeats": 2}}
    recipe = load_recipe(raw, extra_sections={"prompt": Prompt})
    assert recipe.extra["prompt"] == Prompt(template="Review: {text}", repeats=2)
    assert recipe.to_dict()["prompt"] == {"template": "Review: {text}", "repeats": 2}
    assert load_recipe(tiny_recipe(tmp_path), extra_sections={"prompt": Prompt}).extra["prompt"] == Prompt()


def test_undeclared_section_is_still_an_error(tmp_path):
    raw = {**tiny_recipe(tmp_path), "prompt": {"template": "{text}"}}
    with pytest.raises(RecipeError, match=r"^<recipe>: prompt: unknown section$"):
        load_recipe(raw)
    with pytest.raises(RecipeError, match=r"promt: unknown section; did you mean 'prompt'\?"):
        load_recipe({**tiny_recipe(tmp_path), "promt": {}}, extra_sections={"prompt": Prompt})


def test_declared_section_problems_are_reported_like_built_in_ones(tmp_path):
    raw = {**tiny_recipe(tmp_path), "prompt": {"templat": "{text}", "repeats": "two"}}
    with pytest.raises(RecipeError) as info:
        load_recipe(raw, extra_sections={"prompt": Prompt})
    assert info.value.errors == [
        "<recipe>: prompt.templat: unknown key; did you mean 'prompt.template'?",
        '<recipe>: prompt.repeats: expected an integer, got str "two"',
    ]
    with pytest.raises(RecipeError, match=r"^<recipe>: prompt.template: must contain \{text\}, got 'Review'$"):
        load_recipe({**tiny_recipe(tmp_path), "prompt": {"template": "Review"}}, extra_sections={"prompt": Prompt})
    with pytest.raises(RecipeError, match=r"needed: missing section"):
        load_recipe(tiny_recipe(tmp_path), extra_sections={"needed": Needed})


def test_overrides_reach_declared_sections(tmp_path):
    raw = tiny_recipe(tmp_path)
    recipe = load_recipe(raw, ["prompt.repeats=3"], extra_sections={"prompt": Prompt})
    assert recipe.extra["prompt"].repeats == 3
    with pytest.raises(RecipeError, match=r"prompt.repeat: unknown key; did you mean 'prompt.repeats'\?"):
        apply_overrides(raw, ["prompt.repeat=3"], extra_sections={"prompt": Prompt})
    with pytest.raises(RecipeError, match=r"prompt.repeats: unknown section"):
        apply_overrides(raw, ["prompt.repeats=3"])


def test_section_declarations_are_checked():
    with pytest.raises(ValueError, match="'data' is a built-in section"):
        load_recipe({}, extra_sections={"data": Prompt})
    with pytest.raises(TypeError, match=r"recipe_sections\['prompt'\]: expected a dataclass, got dict"):
        load_recipe({}, extra_sections={"prompt": {"template": str}})


def test_subclass_sections_flow_through_from_recipe_and_recipe_json(tmp_path):
    class WithPrompt(IA3Seq2SeqTrainer):
        recipe_sections = {"prompt": Prompt}

    raw = {**tiny_recipe(tmp_path, **{"training.max_steps": 1}), "prompt": {"repeats": 2}}
    trainer = WithPrompt.from_recipe(raw, overrides={"prompt.template": "Say: {text}"})
    assert trainer.recipe.extra["prompt"] == Prompt(template="Say: {text}", repeats=2)
    trainer.train()
    saved = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert saved["prompt"] == {"template": "Say: {text}", "repeats": 2}
    # The saved recipe loads back with the subclass, and is refused without it.
    assert WithPrompt.from_recipe(tmp_path / "out" / "recipe.json").recipe.extra["prompt"].repeats == 2
    with pytest.raises(RecipeError, match="prompt: unknown section"):
        IA3Seq2SeqTrainer.from_recipe(tmp_path / "out" / "recipe.json")
