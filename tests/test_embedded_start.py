"""The embedded SFT model that `posttrain rm` (and `posttrain dpo`) start from when no model is named:
`sft.embedded_sft_model` trains it once with `posttrain sft`'s defaults and caches it under a key of
what fixes it.

The cache tests replace the ~30 s training with a stand-in that saves a freshly built tiny model (and
counts its calls), so they check the caching alone; the last test checks the real model, which the
session's POSTTRAIN_CACHE (tests/conftest.py) trains at most once for every test that needs it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import posttrain
from posttrain.data import embedded
from posttrain.rl import loop, sft
from posttrain.rl.config import ConfigError, config_dict


def save_tiny_model(config):
    """Stand-in for `sft.train`: what it leaves in output_dir, minus the training."""
    out = Path(config.output_dir)
    out.mkdir(parents=True)
    embedded.build_model(seed=0).save_pretrained(out)
    embedded.build_tokenizer().save_pretrained(out)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder of this test's own, and a `sft.train` that counts its calls."""
    monkeypatch.setenv(sft.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def fake_train(config):
        calls.append(config)
        save_tiny_model(config)

    monkeypatch.setattr(sft, "train", fake_train)
    return tmp_path / "cache", calls


def test_trains_once_then_reuses_the_cached_folder(cache):
    folder, calls = cache
    said = []
    path = Path(sft.embedded_sft_model(log=said.append))
    assert path == folder / f"embedded-sft-{sft.embedded_sft_key()}"
    assert said == [
        "no model named: training the embedded SFT model first (posttrain sft defaults, ~30 s) into "
        + str(path)
    ]
    # It trained the SFT defaults (only where the files go differs), and nothing is left beside the folder.
    assert len(calls) == 1
    expected = config_dict(sft.SFTConfig())
    trained = config_dict(calls[0])
    assert {k for k in expected if expected[k] != trained[k]} == {
        "output_dir",
        "save_steps",
        "disable_tqdm",
        "report_to",
    }
    assert sorted(p.name for p in folder.iterdir()) == [path.name, path.name + ".lock"]
    written = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    said.clear()
    assert sft.embedded_sft_model(log=said.append) == str(path)
    assert len(calls) == 1 and said == []  # no second training, not a word
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == written


def test_a_half_written_folder_is_never_reused(cache):
    folder, calls = cache
    key = sft.embedded_sft_key()
    # A run killed while training: its temporary folder has a config but no weights.
    stale = folder / f"embedded-sft-{key}.tmp-12345"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    path = Path(sft.embedded_sft_model(log=lambda _: None))
    assert len(calls) == 1 and (path / "model.safetensors").is_file()
    assert not stale.exists()  # removed by the process that trained


def test_a_failed_training_leaves_nothing_to_reuse(cache, monkeypatch):
    folder, calls = cache

    def killed(config):
        save_tiny_model(config)
        raise KeyboardInterrupt  # after the files, before the rename

    monkeypatch.setattr(sft, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        sft.embedded_sft_model(log=lambda _: None)
    assert not (folder / f"embedded-sft-{sft.embedded_sft_key()}").exists()

    monkeypatch.setattr(sft, "train", lambda config: (calls.append(config), save_tiny_model(config)))
    path = Path(sft.embedded_sft_model(log=lambda _: None))
    assert len(calls) == 1 and path.is_dir()
    assert [p.name for p in folder.glob("*.tmp-*")] == []


def test_the_key_follows_what_fixes_the_model(monkeypatch):
    key = sft.embedded_sft_key()
    assert len(key) == 12 and sft.embedded_sft_key() == key  # deterministic
    changes = [
        (sft, "EMBEDDED_MODEL_LEARNING_RATE", 3e-3),
        (sft, "RUN_DEFAULTS", {**sft.RUN_DEFAULTS, "num_train_epochs": (32.0, 3.0)}),
        (posttrain, "__version__", "0.0.0"),
        (embedded, "MAX_OPERAND", 19),  # another task
    ]
    for module, name, value in changes:
        with monkeypatch.context() as m:
            m.setattr(module, name, value)
            assert sft.embedded_sft_key() != key, name
    assert sft.embedded_sft_key() == key


def test_under_torchrun_a_missing_model_is_an_error_that_says_how_to_make_it(cache, monkeypatch):
    folder, calls = cache
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match=r"not cached .* make it first with one process, `python -c"):
        sft.embedded_sft_model()
    assert calls == [] and not folder.exists()

    monkeypatch.setenv("WORLD_SIZE", "1")
    path = sft.embedded_sft_model(log=lambda _: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sft.embedded_sft_model() == path  # cached: every rank reads it


def test_concurrent_processes_train_it_once(tmp_path):
    # Two processes ask at once; the stand-in training takes a second, so they overlap.
    script = textwrap.dedent(
        f"""
        import json, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from posttrain.rl import loop, sft
        from test_embedded_start import save_tiny_model

        def slow_train(config):
            with open({str(tmp_path / "trainings")!r}, "a") as f:
                f.write(config.output_dir + "\\n")
            time.sleep(1.0)
            save_tiny_model(config)

        sft.train = slow_train
        print(json.dumps(sft.embedded_sft_model(log=lambda _: None)))
        """
    )
    env = {**os.environ, sft.CACHE_ENV: str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    paths = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert paths[0] == paths[1] and (Path(paths[0]) / "model.safetensors").is_file()
    assert len((tmp_path / "trainings").read_text().splitlines()) == 1


def test_the_cached_model_is_the_posttrain_sft_default_model():
    # The session's real cache (tests/conftest.py): trained here or by an earlier test, at most once.
    path = Path(sft.embedded_sft_model())
    assert path.parent == Path(os.environ[sft.CACHE_ENV])
    written = sft.SFTConfig(**{k: v for k, v in _yaml(path / "config.yaml").items()})
    assert config_dict(written) == config_dict(sft.embedded_sft_config(path))
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    _, total = loop.plan_steps(len(embedded.rows("prompt_completion", "train")), written, 1)
    assert [r["step"] for r in steps] == list(range(1, total + 1))  # the whole run, not resumed
    final_eval = [r for r in records if "eval_exact_match" in r][-1]
    assert final_eval["step"] == steps[-1]["step"]
    # The point of starting from it: it already answers most held-out problems (0.98 on this machine).
    from transformers import AutoModelForCausalLM

    from posttrain.rl.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    score = embedded.exact_match(model, load_tokenizer(str(path)), split="test")["exact_match"]
    assert score == pytest.approx(final_eval["eval_exact_match"]) and score >= 0.9


def _yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())
