"""Model and tokenizer loading from local folders and hub ids: what loads, and the one-line errors that
name `model_name_or_path` for every way a local model folder or a tokenizer can be unusable."""

import json
import os
import shutil
import subprocess

import huggingface_hub.constants
import pytest
import torch

from posttrain.cli import main
from posttrain.data import embedded
from posttrain.rl.models import load_causal_lm, load_tokenizer, local_model_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A complete model folder: the embedded tiny model and tokenizer, saved as transformers saves them."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    embedded.build_model(seed=3).save_pretrained(path)
    embedded.build_tokenizer().save_pretrained(path)
    return path


def _copy_without(model_dir, tmp_path, *names):
    out = tmp_path / "broken"
    shutil.copytree(model_dir, out)
    for name in names:
        (out / name).unlink()
    return out


def test_local_folder_loads_the_saved_model_and_tokenizer(model_dir):
    tokenizer = load_tokenizer(str(model_dir))
    assert tokenizer("1+2=3")["input_ids"] == embedded.build_tokenizer()("1+2=3")["input_ids"]
    assert tokenizer.pad_token == embedded.PAD_TOKEN
    model = load_causal_lm(str(model_dir))
    expected = embedded.build_model(seed=3).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_a_home_relative_folder_is_expanded(model_dir, tmp_path, monkeypatch):
    # transformers itself would take "~/tiny" for a malformed hub id
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(model_dir, tmp_path / "tiny")
    assert load_tokenizer("~/tiny").pad_token == embedded.PAD_TOKEN
    assert load_causal_lm("~/tiny").config.vocab_size == 128


@pytest.mark.parametrize(
    "name", ["/no/such/model", "./no-such-model", "~/no-such-model-dir", "runs/sft/final"]
)
def test_a_missing_path_is_named_and_not_sent_to_the_hub(name):
    # "runs/sft/final" has two separators: a path, not an "org/name" hub id
    for load in (load_tokenizer, load_causal_lm):
        with pytest.raises(FileNotFoundError, match=rf"model_name_or_path='{name}': no such file or folder"):
            load(name)


def test_an_empty_name_is_not_the_current_folder():
    with pytest.raises(
        ValueError, match=r"model_name_or_path='' is empty; leave it unset for the embedded model"
    ):
        load_tokenizer("")


def test_hub_ids_still_go_to_the_hub(monkeypatch):
    # Offline here: the hub call fails at once, and the error says the hub was asked.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert local_model_folder("someone/not-a-model") is None and local_model_folder("gpt2") is None
    for load, what in ((load_tokenizer, "tokenizer"), (load_causal_lm, "model")):
        with pytest.raises(
            ValueError,
            match=rf"model_name_or_path='someone/not-a-model': could not load its {what} \(not a local folder, "
            r"and the Hugging Face Hub could not provide it\): OSError",
        ):
            load("someone/not-a-model")


def test_a_file_or_a_folder_without_config_or_weights(model_dir, tmp_path):
    with pytest.raises(
        ValueError, match=r"model_name_or_path='.*config.json' is a file; expected a model folder"
    ):
        load_tokenizer(str(model_dir / "config.json"))
    no_config = _copy_without(model_dir, tmp_path, "config.json")
    for load in (load_tokenizer, load_causal_lm):
        with pytest.raises(
            ValueError, match=r"model_name_or_path='.*broken': the folder has no config.json \(found: "
        ):
            load(str(no_config))
    shutil.rmtree(no_config)
    no_weights = _copy_without(model_dir, tmp_path, "model.safetensors")
    for load in (load_tokenizer, load_causal_lm):
        with pytest.raises(
            ValueError, match=r"'.*broken': the folder has a config.json but no weights \(model.safetensors, "
        ):
            load(str(no_weights))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(
        ValueError, match=r"no config.json \(a PEFT adapter: merge it into its base model first\)"
    ):
        load_tokenizer(str(tmp_path / "adapter"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"the folder has no config.json \(found: nothing\)"):
        load_tokenizer(str(tmp_path / "empty"))


def test_a_folder_without_tokenizer_files(model_dir, tmp_path):
    # transformers 5 returns an empty tokenizer here (every text -> no tokens) instead of failing.
    folder = _copy_without(
        model_dir, tmp_path, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"
    )
    with pytest.raises(
        ValueError, match=r"'.*broken': its tokenizer turns text into no tokens.*found: \['config.json'"
    ):
        load_tokenizer(str(folder))


def _with_special_tokens(model_dir, tmp_path, pad_token, eos_token):
    """A copy of model_dir whose tokenizer_config.json sets these special tokens (null: none, which also
    overrides the defaults of the tokenizer class transformers picks from config.json)."""
    folder = tmp_path / f"pad-{pad_token}-eos-{eos_token}"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(pad_token=pad_token, eos_token=eos_token)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_pad_token_falls_back_to_eos_as_in_trl(model_dir, tmp_path):
    tokenizer = load_tokenizer(str(_with_special_tokens(model_dir, tmp_path, None, embedded.EOS_TOKEN)))
    assert tokenizer.pad_token == embedded.EOS_TOKEN and tokenizer.pad_token_id == 2
    with pytest.raises(
        ValueError, match=r"'.*pad-None-eos-None': its tokenizer has neither a pad nor an eos token"
    ):
        load_tokenizer(str(_with_special_tokens(model_dir, tmp_path, None, None)))


def test_cli_names_bad_model_folders_before_writing_the_run(model_dir, tmp_path, capsys):
    no_weights = _copy_without(model_dir, tmp_path, "model.safetensors")
    run = tmp_path / "run"
    for bad, message in (
        (str(no_weights), "has a config.json but no weights"),
        (str(tmp_path / "missing"), "no such file or folder"),
    ):
        assert main(["sft", "--model_name_or_path", bad, "--max_steps", "1", "--output_dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"posttrain sft: error: model_name_or_path='{bad}'" in err and message in err
        assert len(err.strip().splitlines()) == 1
        assert not run.exists()


def test_cli_subprocess_missing_model_path(tmp_path):
    """The installed `posttrain` script: exit 2, one line naming the option, no run folder or config.yaml."""
    script = shutil.which("posttrain")
    assert script is not None, "the posttrain console script is not installed (pip install -e .)"
    run = tmp_path / "run"
    cmd = [script, "sft", "--model_name_or_path", "/no/such/model", "--output_dir", str(run)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "posttrain sft: error: model_name_or_path='/no/such/model': no such file or folder (and it is not a hub "
        "id) (POSTTRAIN_TRACEBACK=1 shows where)"
    ]
    assert not run.exists()
