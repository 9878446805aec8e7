"""Data loading and checks: each problem is one RecipeError naming the data.* field to change."""

import json

import pytest

from ia3_trainer import RecipeError, load_recipe
from ia3_trainer.data.labels import check_label_lengths
from ia3_trainer.data.preparation import prepare_data
from ia3_trainer.data.splits import load_splits

from conftest import tiny_recipe


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def data_section(tmp_path, **fields):
    raw = tiny_recipe(tmp_path)
    raw["data"].update(fields)
    return load_recipe(raw).data


def test_label_separator_splits_on_the_last_one(tmp_path, tokenizer):
    path = tmp_path / "lines.txt"
    path.write_bytes("Profit rose @ 5 % in caf\xe9 sales@positive\r\nSales fell@negative\r\n\r\nIt is Monday@neutral\n"
                     .encode("latin-1"))
    data = data_section(tmp_path, path="text", data_files={"train": str(path)}, load_kwargs={"encoding": "latin-1"},
                        label_separator="@", validation_size=0, max_train_samples=None)
    train, validation = load_splits(data)
    assert validation is None
    assert train["sentence"][:] == ["Profit rose @ 5 % in caf\xe9 sales", "Sales fell", "It is Monday"]
    assert train["label"][:] == ["positive", "negative", "neutral"]
    prepared = prepare_data(data, tokenizer)
    assert len(prepared.train_dataset) == 3 and prepared.eval_dataset is None
    labels = tokenizer.batch_decode(list(prepared.train_dataset["labels"]), skip_special_tokens=True)
    assert labels == ["positive", "negative", "neutral"]


def test_line_without_separator(tmp_path, tokenizer):
    path = tmp_path / "lines.txt"
    path.write_text("good@positive\nno label here\n")
    data = data_section(tmp_path, path="text", data_files={"train": str(path)}, label_separator="@",
                        validation_size=0)
    with pytest.raises(RecipeError, match=r"data.label_separator: 1 line\(s\) of split 'train' have no '@'"):
        prepare_data(data, tokenizer)


def test_missing_column_lists_the_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "positive"}] * 4)
    data = data_section(tmp_path, data_files={"train": path})
    with pytest.raises(RecipeError) as info:
        prepare_data(data, tokenizer)
    assert str(info.value) == ("data.text_column: no column 'sentence' in split 'train'; its columns are "
                               "['text', 'label']; set data.text_column to one of them")


def test_integer_labels_need_names(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a b", "label": i % 3} for i in range(9)])
    data = data_section(tmp_path, data_files={"train": path}, label_names=None)
    with pytest.raises(RecipeError, match=r"^data.label_names: labels in column 'label' are integers"):
        prepare_data(data, tokenizer)
    data = data_section(tmp_path, data_files={"train": path}, label_names=["negative", "neutral", "positive"],
                        validation_size=3)
    prepared = prepare_data(data, tokenizer)
    assert prepared.label_names == ["negative", "neutral", "positive"]
    assert len(prepared.train_dataset) == 6 and len(prepared.eval_dataset) == 3
    decoded = set(tokenizer.batch_decode(list(prepared.train_dataset["labels"]), skip_special_tokens=True))
    assert decoded <= {"negative", "neutral", "positive"}


def test_class_label_names_are_used(tmp_path, tokenizer):
    import datasets

    folder = tmp_path / "ds"
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "neutral", "positive"])})
    datasets.Dataset.from_dict({"sentence": ["x y"] * 6, "label": [0, 1, 2] * 2}, features=features).to_parquet(
        str(folder / "train.parquet"))
    data = data_section(tmp_path, path="parquet", data_files={"train": str(folder / "train.parquet")},
                        label_names=None, validation_size=0)
    prepared = prepare_data(data, tokenizer)
    assert prepared.label_names == ["negative", "neutral", "positive"]


def test_text_labels_outside_label_names(tmp_path, tokenizer):
    rows = [{"sentence": "a", "label": "positive"}, {"sentence": "b", "label": "bullish"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = data_section(tmp_path, data_files={"train": path}, validation_size=0)
    with pytest.raises(RecipeError, match=r"data.label_names: split 'train' has labels \['bullish'\] that are not in"):
        prepare_data(data, tokenizer)


def test_label_longer_than_max_target_length(tokenizer):
    with pytest.raises(RecipeError) as info:
        check_label_lengths(tokenizer, ["positive", "very positive indeed"], max_target_length=3)
    assert str(info.value).startswith("data.max_target_length: label 'very positive indeed' is ")
    assert str(info.value).endswith("but data.max_target_length is 3; raise it to at least "
                                    f"{len(tokenizer(text_target='very positive indeed').input_ids)}")
    assert check_label_lengths(tokenizer, ["positive", "neutral"], 3) == 2


def test_named_validation_split_and_empty_split(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [{"sentence": "a", "label": "positive"}] * 3)
    valid = write_jsonl(tmp_path / "v.jsonl", [{"sentence": "b", "label": "negative"}] * 2)
    data = data_section(tmp_path, data_files={"train": train, "validation": valid}, validation_split="validation")
    prepared = prepare_data(data, tokenizer)
    assert len(prepared.train_dataset) == 3 and len(prepared.eval_dataset) == 2
    data = data_section(tmp_path, data_files={"train": train}, validation_split="dev")
    with pytest.raises(RecipeError, match=r"data.validation_split: no split 'dev'; the dataset has \['train'\]"):
        prepare_data(data, tokenizer)
    lines, blank = tmp_path / "t.txt", tmp_path / "blank.txt"
    lines.write_text("good@positive\n")
    blank.write_text("\n  \n")
    data = data_section(tmp_path, path="text", data_files={"train": str(lines), "validation": str(blank)},
                        validation_split="validation", label_separator="@")
    with pytest.raises(RecipeError, match=r"data.validation_split: split 'validation' is empty; check data.data_"):
        prepare_data(data, tokenizer)


def test_unloadable_path(tmp_path, tokenizer):
    data = data_section(tmp_path, data_files={"train": str(tmp_path / "missing.jsonl")})
    with pytest.raises(RecipeError, match=r"^data.path: cannot load 'json'"):
        prepare_data(data, tokenizer)


@pytest.mark.parametrize("builder,name", [("json", "empty.jsonl"), ("csv", "empty.csv"), ("text", "empty.txt")])
def test_empty_file_is_a_data_error(tmp_path, tokenizer, builder, name):
    path = tmp_path / name
    path.write_text("")
    data = data_section(tmp_path, path=builder, data_files={"train": str(path)})
    with pytest.raises(RecipeError, match=rf"^data.data_files: cannot read examples from .*{name}.* with '{builder}'"):
        prepare_data(data, tokenizer)


def test_integer_label_ids_outside_label_names(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a b", "label": i} for i in (0, 1, 2, 5, -1)])
    data = data_section(tmp_path, data_files={"train": path}, validation_size=0)
    with pytest.raises(RecipeError) as info:
        prepare_data(data, tokenizer)
    assert str(info.value) == "data.label_names: split 'train' has label ids [-1, 5] but only 3 names"


def test_validation_label_the_training_split_never_has_is_a_warning(tmp_path, tokenizer, caplog):
    train = write_jsonl(tmp_path / "t.jsonl", [{"sentence": "a", "label": "positive"},
                                               {"sentence": "b", "label": "negative"}])
    valid = write_jsonl(tmp_path / "v.jsonl", [{"sentence": "c", "label": "neutral"},
                                               {"sentence": "d", "label": "positive"}])
    data = data_section(tmp_path, data_files={"train": train, "validation": valid}, validation_split="validation")
    with caplog.at_level("WARNING", logger="ia3_trainer.data"):
        prepared = prepare_data(data, tokenizer)
    assert len(prepared.eval_dataset) == 2  # a warning, not an error: training goes on
    assert [r.getMessage() for r in caplog.records if r.name == "ia3_trainer.data"] == [
        "The validation split has labels the training split never has: ['neutral']"]


def test_empty_cells_are_refused(tmp_path, tokenizer):
    rows = [{"sentence": "a", "label": "positive"}, {"sentence": " ", "label": "negative"},
            {"sentence": "c", "label": None}, {"sentence": "d", "label": "neutral"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = data_section(tmp_path, data_files={"train": path}, validation_size=0)
    with pytest.raises(RecipeError, match=r"^data.text_column: 1 row\(s\) of split 'train' have no value in column "
                                          r"'sentence'; drop or fill them in the data$"):
        prepare_data(data, tokenizer)


def test_validation_count_larger_than_the_data(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a", "label": "positive"}] * 5)
    data = data_section(tmp_path, data_files={"train": path}, validation_size=5)
    with pytest.raises(RecipeError, match=r"^data.validation_size: 5 examples held out of 5 in split 'train'"):
        prepare_data(data, tokenizer)


def test_a_dataset_that_needs_a_loading_script(tmp_path, tokenizer):
    folder = tmp_path / "scripted"
    folder.mkdir()
    (folder / "scripted.py").write_text("import datasets\n")
    data = data_section(tmp_path, path=str(folder), data_files=None)
    with pytest.raises(RecipeError, match=r"^data.path: cannot load .*scripted"):
        prepare_data(data, tokenizer)


def test_truncated_sources_are_counted_once(tmp_path, tokenizer, caplog):
    words = "Quarterly sales of the Finnish retailer rose by twelve percent in the third quarter".split()
    sentences = [" ".join(words[:count]) for count in range(1, len(words) + 1)]
    lengths = [len(tokenizer(sentence)["input_ids"]) for sentence in sentences]  # with end-of-sequence
    limit = lengths[len(lengths) // 2]
    assert lengths.count(limit) >= 1 and min(lengths) < limit < max(lengths)  # some under, at and over the limit
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": s, "label": "positive"} for s in sentences])
    data = data_section(tmp_path, data_files={"train": path}, validation_size=0, max_source_length=limit,
                        source_prefix="")
    with caplog.at_level("WARNING", logger="ia3_trainer.data"):
        prepared = prepare_data(data, tokenizer)
    over = sum(length > limit for length in lengths)  # one that exactly fits is not cut
    assert [r.getMessage() for r in caplog.records if r.name == "ia3_trainer.data"] == [
        f"{over} of {len(sentences)} training sources are longer than data.max_source_length={limit} tokens and "
        "were truncated (the model sees only their start); raise data.max_source_length to keep them whole"]
    assert max(len(ids) for ids in prepared.train_dataset["input_ids"]) == limit


def test_texts_in_both_training_and_validation_are_counted(tmp_path, tokenizer, caplog):
    train = write_jsonl(tmp_path / "t.jsonl", [{"sentence": f"s{i}", "label": ["positive", "negative"][i % 2]}
                                               for i in range(6)])
    valid = write_jsonl(tmp_path / "v.jsonl", [{"sentence": s, "label": "negative"} for s in ("s1", "s4", "new")])
    data = data_section(tmp_path, data_files={"train": train, "validation": valid}, validation_split="validation",
                        label_names=["negative", "positive"])
    with caplog.at_level("WARNING", logger="ia3_trainer.data"):
        prepare_data(data, tokenizer)
    messages = [r.getMessage() for r in caplog.records if r.name == "ia3_trainer.data"]
    assert messages == ["2 of 3 validation examples have the same text as a training example (e.g. 's1'): their "
                        "scores say how well the adapter remembers, not how it does on new text; remove the "
                        "duplicates from the data"]


def test_a_folder_as_data_file_says_so(tmp_path, tokenizer):
    data = data_section(tmp_path, data_files={"train": str(tmp_path)})
    with pytest.raises(RecipeError, match=rf"^data.data_files: {tmp_path} is a folder; name the files in it"):
        prepare_data(data, tokenizer)
