"""examples/tfew: a user-style subclass that adds T-Few's losses, run from its own recipe on the tiny model."""

import math

import pytest
import torch

from ia3_trainer import IA3Seq2SeqTrainer, RecipeError, load_recipe

from conftest import REPO, generate_one_by_one, rank_one_by_one


EXAMPLE = REPO / "examples" / "tfew"
RECIPE = EXAMPLE / "recipe.json"


@pytest.fixture
def tfew(monkeypatch):
    """The example's module, imported the way its train.py does (its folder on sys.path)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import tfew

    return tfew


def short(tmp_path, **overrides):
    return {"training.output_dir": str(tmp_path / "out"), "training.max_steps": 4, "training.logging_steps": 1,
            "training.eval_strategy": "no", "data.max_train_samples": 64, "data.max_eval_samples": 24, **overrides}


def test_trains_from_its_own_recipe_and_logs_every_loss_term(tfew, tmp_path):
    trainer = tfew.TFewTrainer.from_recipe(RECIPE, short(tmp_path, **{"tfew.unlikelihood_weight": 0.5}))
    assert trainer.tfew == tfew.TFewSection(unlikelihood_weight=0.5, length_norm_weight=1.0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved and all("ia3_l" in n for n in moved)

    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 4
    for entry in steps:
        terms = [entry["lm_loss"], entry["unlikelihood_loss"], entry["length_norm_loss"]]
        assert all(math.isfinite(t) and t > 0 for t in terms), entry
        assert entry["loss"] == pytest.approx(terms[0] + 0.5 * terms[1] + terms[2], rel=1e-4)
        assert entry["perplexity"] == pytest.approx(math.exp(entry["lm_loss"]))  # of the LM term only

    metrics = trainer.evaluate()  # rank classification comes from IA3Seq2SeqTrainer, unchanged
    _, references = generate_one_by_one(trainer)
    ranked = rank_one_by_one(trainer)
    expected = sum(r == g for r, g in zip(ranked, references, strict=True)) / len(references)
    assert metrics["eval_rank_accuracy"] == pytest.approx(expected) and math.isfinite(metrics["eval_loss"])
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_lm_term_is_the_models_own_loss(tfew, tmp_path):
    # fp32: two ways of computing one loss agree to 1e-5 only without bf16 rounding
    trainer = tfew.TFewTrainer.from_recipe(RECIPE, {**short(tmp_path), "training.bf16": False})
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model.eval()
    with torch.no_grad():
        log_probs, mask = tfew.candidate_token_log_probs(model, batch, trainer.candidate_ids)
        terms = tfew.tfew_losses(log_probs, mask, tfew.gold_choice(batch["labels"], trainer.candidate_ids))
        assert terms["lm"].item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)
        trainer.tfew = tfew.TFewSection(unlikelihood_weight=0.0, length_norm_weight=0.0)
        assert trainer.compute_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_losses_match_a_hand_computation(tfew):
    # One example, two one-token candidates with p = 0.7 (gold) and 0.2, and one two-token candidate.
    log_probs = torch.log(torch.tensor([[[0.7, 1.0], [0.2, 1.0], [0.5, 0.1]]]))
    mask = torch.tensor([[[True, False], [True, False], [True, True]]])
    log_probs = log_probs * mask
    terms = tfew.tfew_losses(log_probs, mask, torch.tensor([0]))
    assert terms["lm"].item() == pytest.approx(-math.log(0.7))
    ul = -(math.log(1 - 0.2) + math.log(1 - 0.5) + math.log(1 - 0.1)) / 3
    assert terms["unlikelihood"].item() == pytest.approx(ul)
    scores = [math.log(0.7), math.log(0.2), (math.log(0.5) + math.log(0.1)) / 2]
    assert terms["length_norm"].item() == pytest.approx(-scores[0] + math.log(sum(math.exp(s) for s in scores)))


def test_gold_choice_matches_labels_to_candidates(tfew):
    candidates = torch.tensor([[5, 1, -100], [6, 7, 1]])
    labels = torch.tensor([[6, 7, 1, -100], [5, 1, -100, -100]])
    assert tfew.gold_choice(labels, candidates).tolist() == [1, 0]
    with pytest.raises(ValueError, match="not one of the candidate labels"):
        tfew.gold_choice(torch.tensor([[6, 1, -100]]), candidates)


def test_the_tfew_section_is_validated(tfew, tmp_path):
    sections = tfew.TFewTrainer.recipe_sections
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPE, {"tfew.unlikelihood_weight": -1, "tfew.length_norm_weight": "big"},
                    extra_sections=sections)
    assert [line.split(": ", 1)[1] for line in info.value.errors] == [
        'tfew.length_norm_weight: expected a number, got str "big"',
    ]
    with pytest.raises(RecipeError, match=r"^--set: tfew.unlikelihood_weight: must be a finite number >= 0, "
                                          r"got -1; 0 turns the term off$"):
        load_recipe(RECIPE, {"tfew.unlikelihood_weight": -1}, extra_sections=sections)
    with pytest.raises(RecipeError, match=r"tfew.unlikelihod_weight: unknown key; did you mean "
                                          r"'tfew.unlikelihood_weight'\?"):
        tfew.TFewTrainer.from_recipe(RECIPE, {"tfew.unlikelihod_weight": 1})
    with pytest.raises(RecipeError, match="tfew: unknown section"):
        IA3Seq2SeqTrainer.from_recipe(RECIPE)  # the section belongs to the subclass


def test_needs_a_label_set(tfew, tmp_path):
    # Free-text targets (every label distinct) have no candidates to rank or push down.
    rows = "".join(f'{{"sentence": "s {i}", "label": "summary number {i}"}}\n' for i in range(40))
    (tmp_path / "free.jsonl").write_text(rows)
    overrides = short(tmp_path, **{"data.data_files": {"train": str(tmp_path / "free.jsonl")},
                                   "data.label_names": None, "data.max_target_length": 16})
    with pytest.raises(ValueError, match="TFewTrainer needs a label set"):
        tfew.TFewTrainer.from_recipe(RECIPE, overrides)


def test_train_script_reports_recipe_errors(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import train

    with pytest.raises(SystemExit) as info:
        train.main([str(RECIPE), "--set", "tfew.length_norm_weight=-2"])
    assert info.value.code == 2
    assert "tfew.length_norm_weight: must be a finite number >= 0" in capsys.readouterr().err
