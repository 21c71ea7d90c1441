"""Loading from every kind of source, and the errors that name the source, split or row."""

import datasets
import pytest
from datasets import Dataset, DatasetDict

from posttrain.data import embedded
from posttrain.data.loading import MissingSplitError, load, load_splits

ROWS = embedded.rows("prompt_completion")[:6]


@pytest.fixture
def files(tmp_path):
    ds = Dataset.from_list(ROWS)
    ds.to_json(tmp_path / "data.jsonl")
    ds.to_json(tmp_path / "data.json")
    ds.to_parquet(tmp_path / "data.parquet")
    ds.to_csv(tmp_path / "data.csv", index=False)
    return tmp_path


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.parquet", "data.csv"])
def test_local_file(files, name):
    ds = load(files / name, split="train")
    assert ds.to_list() == ROWS  # CSV too: "15" stays the string "15"
    assert list(load(str(files / name))) == ["train"]


def test_folder_splits_from_file_names(tmp_path):
    Dataset.from_list(ROWS[:4]).to_json(tmp_path / "train.jsonl")
    Dataset.from_list(ROWS[4:]).to_json(tmp_path / "test.jsonl")
    train, eval_ = load_splits(tmp_path)
    assert train.to_list() == ROWS[:4] and eval_.to_list() == ROWS[4:]
    assert len(load(tmp_path, split="test")) == 2


def test_csv_keeps_text_and_reads_label_as_bool(tmp_path):
    (tmp_path / "u.csv").write_text("prompt,completion,label\n1+1=,007,True\n2+2=,4,False\n")
    assert load(tmp_path / "u.csv", split="train").to_list() == [
        {"prompt": "1+1=", "completion": "007", "label": True},
        {"prompt": "2+2=", "completion": "4", "label": False},
    ]


def test_in_memory_sources():
    ds = Dataset.from_list(ROWS)
    assert load(ds, split="train") is ds
    assert load(ROWS, split="train").to_list() == ROWS
    dd = DatasetDict({"train": ds, "validation": ds.select(range(2))})
    train, eval_ = load_splits(dd, eval_split="validation")
    assert train is ds and len(eval_) == 2
    assert load_splits(dd) == (ds, None)  # no "test" split: no eval set
    assert load_splits(ds, eval_split=None) == (ds, None)


def test_missing_split_lists_available():
    dd = DatasetDict({"train": Dataset.from_list(ROWS), "dev": Dataset.from_list(ROWS)})
    with pytest.raises(MissingSplitError, match=r"has no split 'test'; available splits: \['train', 'dev'\]"):
        load_splits(dd, require_eval=True)
    with pytest.raises(MissingSplitError, match=r"has no split 'training'; available splits: \['train'\]"):
        load(ROWS, split="training")
    with pytest.raises(ValueError, match="require_eval=True needs an eval_split"):
        load_splits(dd, eval_split=None, require_eval=True)


def test_missing_path_and_bad_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'/no/such/dir/train.jsonl' is neither an existing file"):
        load("/no/such/dir/train.jsonl")
    with pytest.raises(
        FileNotFoundError, match="is neither an existing file or folder nor a Hugging Face Hub"
    ):
        load("./relative/missing")
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(
        ValueError, match=r"unsupported file extension '.txt'.*supported: .json, .jsonl, .parquet, .csv"
    ):
        load(tmp_path / "data.txt")
    with pytest.raises(ValueError, match=r"holds no .json/.jsonl/.parquet/.csv files \(found: \['.txt'\]\)"):
        load(tmp_path)
    Dataset.from_list(ROWS).to_json(tmp_path / "a.jsonl")
    Dataset.from_list(ROWS).to_csv(tmp_path / "b.csv")
    with pytest.raises(ValueError, match=r"mixes file types \['.csv', '.jsonl'\]"):
        load(tmp_path)


def test_hub_error_path(monkeypatch):
    # No network here: offline mode makes the real `load_dataset` call fail at once instead of retrying.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"could not load 'someone/not-a-dataset'.*Hub could not provide it"):
        load("someone/not-a-dataset", split="train")


def test_empty_and_malformed_sources(tmp_path):
    empty = Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(ValueError, match=r"split 'train' of the in-memory Dataset is empty \(0 rows\)"):
        load(empty, split="train")
    with pytest.raises(ValueError, match=r"split 'test' of the in-memory DatasetDict is empty"):
        load_splits(DatasetDict({"train": Dataset.from_list(ROWS), "test": empty}))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"file '.*empty.jsonl' is empty"):
        load(tmp_path / "empty.jsonl", split="train")
    (tmp_path / "broken.json").write_text('{"prompt": ')
    with pytest.raises(ValueError, match=r"could not read file '.*broken.json' as json"):
        load(tmp_path / "broken.json", split="train")
    # Files with no rows but some bytes: blank lines, an empty JSON list, a CSV header alone
    for name, text in (("blank.jsonl", "\n\n"), ("list.json", "[]"), ("header.csv", "prompt,completion\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"file '.*{name}' holds no rows"):
            load(tmp_path / name, split="train")


def test_folders_with_unreadable_or_empty_files(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": ')
    with pytest.raises(
        ValueError, match=r"could not read folder '.*broken' \(.jsonl files\): .*JSON parse error"
    ):
        load(tmp_path / "broken")
    (tmp_path / "no_test").mkdir()
    Dataset.from_list(ROWS).to_json(tmp_path / "no_test" / "train.jsonl")
    (tmp_path / "no_test" / "test.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"folder '.*no_test' holds no rows \(Instruction \"test\""):
        load_splits(tmp_path / "no_test")
    with pytest.raises(ValueError, match="the list of rows is empty"):
        load([])
    with pytest.raises(TypeError, match="row 1 of the list is a str"):
        load([{"prompt": "a"}, "b"])
    with pytest.raises(ValueError, match="row 2: field 'prompt' is a list but row 0 has a str"):
        load([{"prompt": "a"}, {"prompt": "b"}, {"prompt": [1]}])
    with pytest.raises(ValueError, match="the dataset source is an empty string"):
        load_splits("")
    with pytest.raises(TypeError, match="source must be a Hub id or a path"):
        load(3)
    with pytest.raises(ValueError, match="name='x' selects a Hub dataset configuration"):
        load(tmp_path, name="x")


def test_cli_names_bad_dataset_sources_in_one_line_before_writing_the_run(tmp_path, monkeypatch, capsys):
    from posttrain.cli import main

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (tmp_path / "rows.txt").write_text("1+1=2")
    (tmp_path / "empty.jsonl").write_text("")
    run = tmp_path / "run"
    for source, message in (
        (
            tmp_path / "missing.jsonl",
            "is neither an existing file or folder nor a Hugging Face Hub dataset id",
        ),
        (tmp_path / "rows.txt", "unsupported file extension '.txt'"),
        (tmp_path / "empty.jsonl", "empty.jsonl' is empty"),
        ("someone/not-a-dataset", "the Hugging Face Hub could not provide it"),
    ):
        assert main(["sft", "--dataset_name", str(source), "--output_dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("posttrain sft: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
        assert not run.exists()
