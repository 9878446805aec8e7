"""Several adapters in one batch (`IA3Predictor.predict/score(..., adapter=[...])`, `ia3_trainer.modeling.layers`): the
same results as each adapter alone, and the installed IA3 forward trains, saves, loads and merges as peft's does."""

import copy
import json
import pickle
import random

import numpy as np
import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from peft.tuners.ia3 import IA3Layer
from transformers import AutoTokenizer, T5ForConditionalGeneration

from ia3_trainer import IA3Seq2SeqTrainer
from ia3_trainer.data.encoding import IGNORE_INDEX, build_collator, encode_batch
from ia3_trainer.inference import predictor as predictor_module
from ia3_trainer.inference.predictor import IA3Predictor
from ia3_trainer.modeling import scoring
from ia3_trainer.modeling.layers import IA3Linear, adapter_rows, install
from ia3_trainer.modeling.loading import cast_frozen_weights
from ia3_trainer.modeling.mixed import score_rows
from ia3_trainer.modeling.scoring import candidate_label_ids, rank_candidates, score_candidates

from conftest import TINY_ASSETS, TINY_MODEL_DIR, free_port, tiny_config, tiny_recipe


ROWS = [json.loads(line) for line in (TINY_ASSETS / "tiny-sentiment.jsonl").read_text().splitlines()]
# Three tasks on the same sentences: other prefixes, label sets, label lengths (2, 3 and up to 10 tokens), source
# limits and target modules ("news" leaves the feed-forward layers alone).
TASKS = {
    "sentiment": ({"negative": "negative", "neutral": "neutral", "positive": "positive"}, {}),
    "mood": ({"negative": "bad", "neutral": "meh", "positive": "good"}, {}),
    "news": ({"negative": "bad news today", "neutral": "nothing new", "positive": "good news"},
             {"data.max_target_length": 10, "data.max_source_length": 24, "ia3.target_modules": ["k", "v"],
              "ia3.feedforward_modules": []}),
}


def train_task(folder, base_dir, task):
    labels, overrides = TASKS[task]
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps({**row, "label": labels[row["label"]]}) + "\n" for row in ROWS))
    raw = tiny_recipe(folder, **{
        "training.max_steps": 20, "model.name_or_path": str(base_dir), "model.init": "pretrained",
        "training.bf16": False, "data.source_prefix": f"{task}: ", "data.data_files": {"train": str(data)},
        "data.label_names": list(labels.values()), **overrides,
    })
    IA3Seq2SeqTrainer.from_recipe(raw).train()
    return folder / "out"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_t5_dir):
    return {task: train_task(tmp_path_factory.mktemp(task), tiny_t5_dir, task) for task in TASKS}


@pytest.fixture
def predictor(adapters):
    predictor = IA3Predictor.from_pretrained(adapters["sentiment"], adapter_name="sentiment", device="cpu")
    for task in ("mood", "news"):
        predictor.load_adapter(adapters[task], task)
    predictor.set_adapter("sentiment")
    return predictor


def shuffled_tasks(count, seed=0):
    names = [list(TASKS)[i % len(TASKS)] for i in range(count)]
    random.Random(seed).shuffle(names)
    return names


def texts_of(count, start=500):
    return [row["sentence"] for row in ROWS[start:start + count]]


def trimmed(ids):
    """Token ids without the padding a batch adds after a row's end (-100 between batches, pad 0 within one)."""
    ids = [int(i) for i in ids]
    while ids and ids[-1] in (IGNORE_INDEX, 0):
        ids.pop()
    return ids


def generated(ids, eos=1):
    """Generated ids up to the first EOS after the decoder start: what decoding reads, without any padding."""
    ids = trimmed(ids)
    return ids[:ids.index(eos, 1) + 1] if eos in ids[1:] else ids


def test_a_mixed_forward_gives_each_row_its_adapters_logits(predictor, monkeypatch):
    fallbacks = []  # rank_candidates falls back to scoring every label only when its walk disagrees with a decode
    score_sequences = scoring.score_sequences
    monkeypatch.setattr(scoring, "score_sequences", lambda *a, **k: fallbacks.append(1) or score_sequences(*a, **k))
    model, names = predictor.model, ["mood", "sentiment", "news", "news", "mood"]
    texts = texts_of(len(names))
    collated = build_collator(predictor.tokenizer)(predictor.encode(texts, names))
    batch = {key: collated[key] for key in ("input_ids", "attention_mask")}
    decoder_input_ids = torch.tensor([[0, 72, 392, 96]] * len(names))
    predictor.set_adapter("mood")
    with torch.no_grad():
        with adapter_rows(model, names):
            mixed = model(**batch, decoder_input_ids=decoder_input_ids).logits
        assert model.active_adapter == "mood", "adapter_rows changed the active adapter"
        alone = {}
        for name in TASKS:
            predictor.set_adapter(name)
            alone[name] = model(**batch, decoder_input_ids=decoder_input_ids).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=0, atol=1e-5)
    assert not torch.allclose(alone["mood"], alone["news"], atol=1e-3), "the adapters agree; the test is empty"

    # Rank classification repeats each example once per candidate (B * K rows), or holds some examples' label
    # prefixes (rank_candidates' walk: rows of some examples only); beam search repeats each example once per beam.
    candidates = candidate_label_ids(predictor.tokenizer, ["bad news today", "meh", "positive", "bad news", "me"])
    predictor.set_adapter("sentiment")
    with torch.no_grad():
        with adapter_rows(model, names):
            encoded = model.get_encoder()(**batch)
            ranked = score_candidates(model, encoded, batch["attention_mask"], candidates, chunk_rows=10)
            calls = len(fallbacks)
            chosen = rank_candidates(model, encoded, batch["attention_mask"], candidates, chunk_rows=2)
            assert len(fallbacks) == calls, "rank_candidates fell back to scoring every label"
            beams = model.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False)
        assert model.active_adapter == "sentiment", "adapter_rows changed the active adapter"
        for name in TASKS:
            predictor.set_adapter(name)
            rows = [i for i, row in enumerate(names) if row == name]
            alone_encoded = (model.get_encoder()(**batch)[0][rows],)
            expected = score_candidates(model, alone_encoded, batch["attention_mask"][rows], candidates)
            torch.testing.assert_close(ranked[rows], expected, rtol=0, atol=1e-5)
            assert torch.equal(chosen[rows], expected.argmax(dim=-1))
            alone_beams = model.generate(**{k: v[rows] for k, v in batch.items()}, max_new_tokens=4, num_beams=2,
                                         do_sample=False)
            assert [generated(ids) for ids in beams[rows]] == [generated(ids) for ids in alone_beams]


@pytest.mark.parametrize("max_new_tokens", [None, 4], ids=["own-bounds", "one-bound"])
def test_predict_with_an_adapter_per_text_equals_each_adapter_alone(predictor, max_new_tokens, monkeypatch):
    # Own bounds (2, 3, 10): batched in order of bound, some batches mix two adapters. One bound: the texts keep
    # their order and every batch mixes all three.
    texts, names = texts_of(40), shuffled_tasks(40)
    batches = []

    def spy(model, batch, adapters, **kwargs):
        batches.append(sorted(set(adapters)))
        return score_rows(model, batch, adapters, **kwargs)

    monkeypatch.setattr(predictor_module, "score_rows", spy)
    mixed = predictor.predict(texts, adapter=names, batch_size=16, max_new_tokens=max_new_tokens)
    assert len(batches) == 3 and (max(map(len, batches)) == 2 if max_new_tokens is None else
                                  batches == [sorted(TASKS)] * 3)
    monkeypatch.undo()
    for name, (labels, _) in TASKS.items():
        rows = [i for i, row in enumerate(names) if row == name]
        predictor.set_adapter(name)
        alone = predictor.predict([texts[i] for i in rows], batch_size=16, max_new_tokens=max_new_tokens)
        assert [mixed[i] for i in rows] == alone
        # 20 steps do not teach "news" its long labels: it runs to its 10-token bound, past the others' 2 and 3.
        assert name == "news" or {mixed[i] for i in rows} & set(labels.values()), f"{name}: none of its labels"
    predictor.set_adapter("mood")
    assert predictor.predict(texts[:6]) == predictor.predict(texts[:6], adapter="mood")
    predictor.set_adapter("sentiment")
    assert predictor.predict(texts[:6]) != predictor.predict(texts[:6], adapter="mood")  # one name: every text
    # One name per text, and each text gets its own adapter's prefix and source limit.
    long = " ".join(texts[:3])
    features = predictor.encode([long, long, texts[0]], ["news", "mood", "news"])
    assert features[1]["input_ids"] == encode_batch({"sentence": [long]}, predictor.tokenizer,
                                                    predictor.adapter_settings("mood").data)["input_ids"][0]
    assert len(features[0]["input_ids"]) == 24 < len(features[1]["input_ids"])
    assert features[2]["input_ids"][:3] == predictor.tokenizer("news")["input_ids"][:3]  # its own prefix


def tokenized(predictor, name, start, count):
    """Examples of task `name` encoded with its adapter's recipe, with labels."""
    labels, _ = TASKS[name]
    rows = ROWS[start:start + count]
    batch = {"sentence": [row["sentence"] for row in rows], "label": [labels[row["label"]] for row in rows]}
    encoded = encode_batch(batch, predictor.tokenizer, predictor.adapter_settings(name).data)
    return [{"input_ids": ids, "labels": target} for ids, target in
            zip(encoded["input_ids"], encoded["labels"], strict=True)]


def test_score_with_an_adapter_per_example_equals_each_adapter_alone(predictor):
    names = shuffled_tasks(30, seed=1)
    per_task = {name: tokenized(predictor, name, 500, names.count(name)) for name in TASKS}
    taken = dict.fromkeys(TASKS, 0)
    examples = []
    for name in names:
        examples.append(per_task[name][taken[name]])
        taken[name] += 1
    mixed = predictor.score(examples, adapter=names, batch_size=8)
    for name in TASKS:
        rows = [i for i, row in enumerate(names) if row == name]
        predictor.set_adapter(name)
        alone = predictor.score(per_task[name], batch_size=8)
        np.testing.assert_allclose(mixed.nll_sum[rows], alone.nll_sum, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(mixed.token_count[rows], alone.token_count)
        np.testing.assert_array_equal(mixed.rank_choice[rows], alone.rank_choice)
        assert [generated(ids) for ids in mixed.generated[rows]] == [generated(ids) for ids in alone.generated]
        for field in ("teacher_forced", "labels"):
            assert [trimmed(ids) for ids in getattr(mixed, field)[rows]] == \
                [trimmed(ids) for ids in getattr(alone, field)], field
    assert len(set(mixed.rank_choice.tolist())) > 1, "every example ranks the same label; the test is empty"

    predictor.adapter_settings("news").label_names = None  # an adapter without a label set: its rows are not ranked
    without = predictor.score(examples, adapter=names, batch_size=8)
    news = np.array(names) == "news"
    assert (without.rank_choice[news] == -1).all()
    np.testing.assert_array_equal(without.rank_choice[~news], mixed.rank_choice[~news])


def test_bad_adapter_lists_are_python_errors(predictor, tiny_t5_dir, tmp_path, caplog):
    texts = texts_of(3)
    loaded = r"\['sentiment', 'mood', 'news'\]"
    with pytest.raises(ValueError, match=rf"no adapter named 'topic'; loaded adapters: {loaded}"):
        predictor.predict(texts, adapter=["mood", "topic", "news"])
    with pytest.raises(ValueError, match="adapter: has 2 names for 3 texts; give one adapter name per text"):
        predictor.predict(texts, adapter=["mood", "news"])
    with pytest.raises(TypeError, match=r"adapter 2: must be an adapter name \(str\), got int"):
        predictor.score([{"input_ids": [5, 1], "labels": [6, 1]}] * 2, adapter=["mood", 1])
    with pytest.raises(TypeError, match="adapter: must be an adapter name or a list of them, got dict"):
        predictor.predict(texts, adapter={"mood": 1})

    # An adapter of another base model loads with a warning, and never shares a batch with the others.
    torch.manual_seed(1)
    other_base = T5ForConditionalGeneration(tiny_config("t5", d_ff=24))
    other_base.save_pretrained(tmp_path / "base")
    adapter = get_peft_model(other_base, IA3Config(task_type="SEQ_2_SEQ_LM"))
    adapter.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    adapter.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="cannot load the adapter onto"):
        predictor.load_adapter(tmp_path / "other", "other")  # d_ff 24 vs 32: the vectors do not fit
    same_shape = T5ForConditionalGeneration(tiny_config("t5"))
    same_shape.save_pretrained(tmp_path / "base2")
    adapter = get_peft_model(same_shape, IA3Config(task_type="SEQ_2_SEQ_LM"))
    adapter.peft_config["default"].base_model_name_or_path = str(tmp_path / "base2")
    adapter.save_pretrained(tmp_path / "other2")
    predictor.load_adapter(tmp_path / "other2", "other2")
    assert "was trained on" in caplog.text
    with pytest.raises(ValueError, match=r"adapters trained on different base models cannot share a batch \("
                                         r"'mood' on '.*tiny-t5-pretrained.*', 'other2' on '.*base2'\)"):
        predictor.predict(texts[:2], adapter=["mood", "other2"])
    alone = predictor.predict(texts[:2], adapter="other2")  # alone it still runs, as set_adapter allows
    predictor.set_adapter("other2")
    assert len(alone) == 2 and alone == predictor.predict(texts[:2])

    with pytest.raises(RuntimeError, match="got 2 rows, not a multiple of the 3 rows that adapter_rows names"):
        with adapter_rows(predictor.model, ["mood", "news", "mood"]), torch.no_grad():
            predictor.model(input_ids=torch.tensor([[5, 1], [6, 1]]), decoder_input_ids=torch.tensor([[0], [0]]))


# --- the installed forward against peft's -----------------------------------------------------------------------


def two_adapter_model(model):
    """`model` with two IA3 adapters of random vectors (the second without feed-forward targets)."""
    model = get_peft_model(model, IA3Config(task_type="SEQ_2_SEQ_LM"))
    model.add_adapter("b", IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=["k", "v"], feedforward_modules=[]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ia3_l" in name:
                parameter.uniform_(0.5, 1.5)
    return model


INPUTS = {"input_ids": torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
          "decoder_input_ids": torch.tensor([[0, 11, 12], [0, 13, 14]])}


def logits(model, **extra):
    with torch.no_grad():
        return model(**INPUTS, **extra).logits


def test_installed_layers_keep_peft_behaviour(tiny_t5, tmp_path):
    peft_model = two_adapter_model(copy.deepcopy(tiny_t5)).eval()  # get_peft_model changes the model it wraps
    model = copy.deepcopy(peft_model)
    keys = list(model.state_dict())
    assert install(model) == 16 and install(model) == 16
    ia3 = [module for module in model.modules() if isinstance(module, IA3Layer)]
    assert ia3 and all(type(module) is IA3Linear for module in ia3)
    assert list(model.state_dict()) == keys

    for adapter in ("default", "b"):
        model.set_adapter(adapter)
        peft_model.set_adapter(adapter)
        assert torch.equal(logits(model), logits(peft_model))  # fp32: exactly peft's product
    model.base_model.set_adapter(["default", "b"])  # several active adapters: peft's forward
    peft_model.base_model.set_adapter(["default", "b"])
    assert torch.equal(logits(model), logits(peft_model))
    model.set_adapter("default")
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(model.get_base_model()))
    assert torch.equal(logits(pickle.loads(pickle.dumps(model))), logits(model))
    assert torch.equal(logits(copy.deepcopy(model)), logits(model))

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_t5, tmp_path / "adapter").eval()
    install(reloaded)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)

    expected = logits(model)
    model.merge_adapter()
    with pytest.raises(ValueError, match="an adapter is merged into the base weights; unmerge it"):
        with adapter_rows(model, ["default", "b"]):
            pass
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="Unmerge result can be inaccurate"):  # peft's own warning
        model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert not any(isinstance(module, IA3Layer) for module in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)


def train_steps(model, steps=4, autocast=False):
    """A few AdamW steps on one batch; the losses and the final IA3 vectors."""
    model.train()
    labels = torch.tensor([[11, 12, 1], [13, 14, 1]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=INPUTS["input_ids"], attention_mask=INPUTS["attention_mask"], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    vectors = {name: p.detach().clone() for name, p in model.named_parameters() if "ia3_l" in name}
    return losses, vectors


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_training_with_the_installed_forward_matches_peft(tiny_t5, bf16):
    peft_model = get_peft_model(tiny_t5, IA3Config(task_type="SEQ_2_SEQ_LM"))
    model = copy.deepcopy(peft_model)
    install(model)
    if bf16:  # as the trainer stores the frozen base with bf16 on; the IA3 vectors stay fp32
        for each in (model, peft_model):
            cast_frozen_weights(each, torch.bfloat16)
    losses, vectors = train_steps(model, autocast=bf16)
    expected_losses, expected_vectors = train_steps(peft_model, autocast=bf16)
    assert all(v.dtype == torch.float32 for v in vectors.values())
    assert losses[-1] < losses[0]
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 0, "atol": 1e-6}
    torch.testing.assert_close(losses, expected_losses, **tolerance)
    for name, vector in vectors.items():
        torch.testing.assert_close(vector, expected_vectors[name], **tolerance)


def test_gradients_flow_per_row_under_adapter_rows(tiny_t5):
    model = two_adapter_model(tiny_t5)
    model.base_model.set_adapter(["default", "b"])  # both trainable
    install(model)
    labels = torch.tensor([[11, 12, 1], [13, 14, 1]])
    with adapter_rows(model, ["b", "b"]):
        model(input_ids=INPUTS["input_ids"], attention_mask=INPUTS["attention_mask"], labels=labels).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if "ia3_l" in name}
    assert all(grad is None or not grad.any() for name, grad in grads.items() if name.endswith(".default"))
    assert all(grads[name].abs().sum() > 0 for name in grads if name.endswith(".b"))


# --- DDP and FSDP2: two gloo processes on CPU ----------------------------------------------------------------------


def _installed_tiny_model():
    from transformers import set_seed

    set_seed(0)
    model = get_peft_model(T5ForConditionalGeneration(tiny_config("t5")), IA3Config(task_type="SEQ_2_SEQ_LM"))
    install(model)
    return model


def _half(rank):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (4, 6), generator=generator)
    labels = torch.randint(3, 500, (4, 3), generator=generator)
    return ids[2 * rank:2 * rank + 2], labels[2 * rank:2 * rank + 2]


def _train_in_process_group(rank, world, port, wraps, out):
    import os

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for wrap in wraps:
        model = _installed_tiny_model()
        if wrap == "fsdp2":  # the IA3 vectors become DTensors between steps
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for block in [*model.base_model.model.encoder.block, *model.base_model.model.decoder.block]:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        ids, labels = _half(rank)
        for _ in range(3):
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        vectors = {name.removeprefix("module."): getattr(value, "full_tensor", lambda v=value: v)().detach()
                   for name, value in model.state_dict().items() if "ia3_l" in name}
        if rank == 0:
            torch.save(vectors, out / f"{wrap}.pt")
        dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # done: never wait on the interpreter's shutdown, where gloo's threads can hang


@pytest.mark.slow
def test_installed_forward_trains_under_ddp_and_fsdp2(tmp_path):
    import time

    wraps = ["ddp", "fsdp2"]  # one after the other in the same two processes
    context = torch.multiprocessing.start_processes(_train_in_process_group, args=(2, free_port(), wraps, tmp_path),
                                                    nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two training processes did not finish within 180 s")
    model = _installed_tiny_model()  # one process, both halves: the mean of the two halves' losses
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        (sum(model(input_ids=ids, labels=labels).loss for ids, labels in map(_half, range(2))) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    expected = {name: value for name, value in model.state_dict().items() if "ia3_l" in name}
    assert any((value != 1).any() for value in expected.values())
    for wrap in wraps:
        got = torch.load(tmp_path / f"{wrap}.pt")
        assert got.keys() == expected.keys(), wrap
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=lambda m, w=wrap: f"{w}: {m}")
