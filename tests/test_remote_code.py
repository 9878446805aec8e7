"""A model folder's own Python code never runs unless the recipe sets model.trust_remote_code, even when stdin
answers transformers' `[y/N]` question with `y`."""

import io
import json
import shutil
import sys

import pytest

from ia3_trainer import IA3Seq2SeqTrainer
from ia3_trainer.cli.main import main
from ia3_trainer.modeling.loading import load_model
from ia3_trainer.recipe.loading import ModelSection

from conftest import TINY_ASSETS, tiny_recipe


def custom_code_model(source, folder, marker):
    """A copy of `source` whose config and tokenizer name classes in a `custom_code.py` that appends to `marker`
    when it is imported; its model_type is one transformers does not know, so only that code could load it."""
    shutil.copytree(source, folder)
    (folder / "custom_code.py").write_text(
        f"with open({str(marker)!r}, 'a') as marker:\n"
        "    marker.write('ran\\n')\n"
        "from transformers import T5Config, T5ForConditionalGeneration, T5TokenizerFast\n"
        "class CustomConfig(T5Config):\n    model_type = 'custom-t5'\n"
        "class CustomModel(T5ForConditionalGeneration):\n    config_class = CustomConfig\n"
        "class CustomTokenizer(T5TokenizerFast):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-t5", auto_map={"AutoConfig": "custom_code.CustomConfig",
                                                    "AutoModelForSeq2SeqLM": "custom_code.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    add_tokenizer_auto_map(folder)
    return folder


def add_tokenizer_auto_map(folder):
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["custom_code.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory, tiny_t5_dir):
    folder = tmp_path_factory.mktemp("plain-adapter")
    raw = tiny_recipe(folder, **{"model.name_or_path": str(tiny_t5_dir), "model.init": "pretrained",
                                 "training.max_steps": 1})
    IA3Seq2SeqTrainer.from_recipe(raw).train()
    return folder / "out"


@pytest.fixture
def hostile(tmp_path, tiny_t5_dir, plain_adapter, monkeypatch):
    """A model folder with custom code (its own name: transformers caches imported modules by folder name), an
    adapter whose base and tokenizer point at such code, and stdin answering `y` to every question."""
    marker = tmp_path / "EXECUTED"
    model = custom_code_model(tiny_t5_dir, tmp_path / f"custom-{tmp_path.name}", marker)
    adapter = tmp_path / "adapter"
    shutil.copytree(plain_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(model)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    shutil.copy(model / "custom_code.py", adapter / "custom_code.py")
    add_tokenizer_auto_map(adapter)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 100))
    return model, adapter, marker


@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "merge", "init"])
def test_no_command_runs_a_model_folders_code(hostile, tmp_path, capsys, command):
    model, adapter, marker = hostile
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe(tmp_path, **{"model.name_or_path": str(model),
                                                          "model.init": "pretrained"})))
    argv = {
        "train": ["train", str(recipe)],
        "predict": ["predict", str(adapter), "Sales rose."],
        "evaluate": ["evaluate", str(adapter), "--data", str(TINY_ASSETS / "tiny-sentiment.jsonl"), "--output-dir",
                     str(tmp_path / "report")],
        "merge": ["merge", str(adapter), str(tmp_path / "merged")],
        "init": ["init", "--data", str(TINY_ASSETS / "tiny-sentiment.jsonl"), "--model", str(model),
                 "-o", str(tmp_path / "init.json")],
    }[command]
    if command == "init":
        assert main(argv) == 0  # the tokenizer's own class is known: init measures lengths with it
    else:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        allow = ("the recipe sets model.trust_remote_code" if command == "train"
                 else "you pass trust_remote_code=True (ia3-trainer: --trust-remote-code)")
        assert "ships its own Python code (custom_code.Custom" in err and f"which runs only when {allow}" in err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not marker.exists(), f"{command} ran the model folder's code"


def trusting(adapter):
    """The adapter's own recipe.json asks for the base model's code to run: what a hostile adapter would say."""
    recipe = json.loads((adapter / "recipe.json").read_text())
    recipe["model"]["trust_remote_code"] = True
    (adapter / "recipe.json").write_text(json.dumps(recipe))
    return adapter


@pytest.mark.parametrize("command", ["predict", "evaluate", "merge"])
def test_an_adapters_own_recipe_cannot_turn_remote_code_on(hostile, tmp_path, capsys, command):
    """What an adapter folder says is data: its recipe.json's trust_remote_code is not permission to run code."""
    _, adapter, marker = hostile
    trusting(adapter)
    argv = {"predict": ["predict", str(adapter), "Sales rose."],
            "evaluate": ["evaluate", str(adapter), "--data", str(TINY_ASSETS / "tiny-sentiment.jsonl"),
                         "--output-dir", str(tmp_path / "report")],
            "merge": ["merge", str(adapter), str(tmp_path / "merged")]}[command]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "the adapter's recipe.json asks for it; an adapter cannot allow it" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not marker.exists(), f"{command} ran code because the adapter's recipe.json asked for it"


def test_a_hub_adapter_id_runs_no_code(hostile, tmp_path, monkeypatch, capsys):
    """The same through the Hub: `predict alice/evil-adapter` downloads the adapter (from the local test Hub) and
    runs none of the code that its base model ships, although its recipe.json asks for it."""
    from huggingface_hub import HfApi

    from hub_server import HubServer, use_hub

    _, adapter, marker = hostile
    trusting(adapter)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with HubServer() as server:
        use_hub(monkeypatch, server.endpoint, as_default=True)
        api = HfApi(endpoint=server.endpoint)
        api.create_repo("mallory/evil-adapter")
        api.upload_folder(repo_id="mallory/evil-adapter", folder_path=str(adapter))
        with pytest.raises(SystemExit) as info:
            main(["predict", "mallory/evil-adapter", "Sales rose."])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "an adapter cannot allow it" in err and "Traceback" not in err
    assert not marker.exists(), "a Hub adapter's recipe.json made its base model's code run"


def test_trust_remote_code_flag_runs_the_code_and_says_so(hostile, capsys):
    """The control for the adapter commands: the person running the command can allow the code, and is told."""
    _, adapter, marker = hostile
    assert main(["predict", str(adapter), "Sales rose.", "--trust-remote-code"]) == 0
    assert marker.read_text().startswith("ran\n")  # once per folder whose code loads (the tokenizer's, the model's)
    assert "--trust-remote-code is on" in capsys.readouterr().err


def test_the_code_runs_when_the_recipe_trusts_it(hostile):
    """The control: the same folder's code does run with trust_remote_code, so the test above can fail."""
    model, _, marker = hostile
    load_model(ModelSection(name_or_path=str(model), init="pretrained", trust_remote_code=True))
    assert marker.read_text() == "ran\n"
