"""QLoRA: `load_in_4bit` / `load_in_8bit` load the frozen base through bitsandbytes and LoRA trains on it.

Runs are refused off CUDA (bitsandbytes' CPU kernels are slower than the float32 model they replace). The
tests widen `config.QUANTIZED_DEVICE_TYPES` to the CPU, where bitsandbytes (>= 0.49) also runs, so the
path a GPU run of SFT takes (quantized load, peft's k-bit preparation, training, adapter checkpoints) is
exercised here. Not the loops that generate or evaluate before training (GRPO, RLOO, PPO, Online DPO): on the
CPU bitsandbytes repacks 4-bit weights after a no-grad forward, and the next training forward fails in
`matmul_4bit`; whether CUDA's kernels do the same needs a GPU to check.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _optional import import_or_skip

from posttrain.data import embedded
from posttrain.rl import config as config_module
from posttrain.rl import lora, models, sft
from posttrain.rl.config import ConfigError, TrainConfig
from posttrain.rl.logprobs import token_logprobs

peft = import_or_skip("peft")
bitsandbytes = import_or_skip("bitsandbytes")

CPU = torch.device("cpu")


def cpu_run(config, bf16=False):
    """What `lora.quantization` reads of a run: its config, device and resolved bf16."""
    return SimpleNamespace(config=config, device=CPU, bf16=bf16)


@pytest.fixture
def cpu_allowed(monkeypatch):
    monkeypatch.setattr(config_module, "QUANTIZED_DEVICE_TYPES", ("cuda", "cpu"))


def qlora(**options):
    return TrainConfig(use_peft=True, lora_dropout=0.0, **options)


def batch_of(tokenizer, n=4):
    rows = [
        {"prompt": r["prompt"], "completion": r["completion"]}
        for r in embedded.rows("prompt_completion", "train", seed=0)[:n]
    ]
    ids = [tokenizer(r["prompt"] + r["completion"])["input_ids"] for r in rows]
    prompt_lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
    T = max(map(len, ids))
    input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (T - len(x)) for x in ids])
    attention = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])
    completion = torch.tensor(
        [[int(p <= t < len(x)) for t in range(T)] for x, p in zip(ids, prompt_lengths, strict=True)]
    )
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def full_logits_logps(model, batch):
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return torch.nn.functional.pad(logps, (1, 0)) * batch["completion_mask"]


@pytest.mark.parametrize("bits", [4, 8])
def test_the_base_loads_quantized_and_only_the_adapters_train(cpu_allowed, start, bits):
    config = qlora(**{f"load_in_{bits}bit": True})
    model = models.load_causal_lm(start, quantization=lora.quantization(cpu_run(config)))
    linear = bitsandbytes.nn.Linear4bit if bits == 4 else bitsandbytes.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].self_attn.q_proj, linear)
    float_model = models.load_causal_lm(start)
    tokenizer = embedded.build_tokenizer()
    batch = batch_of(tokenizer)
    quantized, exact = full_logits_logps(model, batch), full_logits_logps(float_model, batch)
    # quantization moved the log-probs, and not by much
    assert 1e-4 < (quantized - exact).abs().max() < 0.5

    model = lora.wrap(model, config)
    with torch.no_grad():  # B starts at 0: give the adapters a value so that every one gets a gradient
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    out = token_logprobs(model, batch)
    # the fused path reads the (unquantized) output layer through the peft wrapper: same as full logits
    torch.testing.assert_close(
        out.logps * batch["completion_mask"], full_logits_logps(model, batch), rtol=1e-5, atol=1e-5
    )
    (-(out.logps * batch["completion_mask"]).sum()).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in n for n in trained)
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)


def read_losses(out):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_a_qlora_sft_run_checkpoints_the_adapter_and_resumes_exactly(cpu_allowed, start, tmp_path):
    shared = dict(model_name_or_path=start, per_device_train_batch_size=8, learning_rate=1e-2, max_steps=4, eval_steps=0, disable_tqdm=True, report_to="none", use_peft=True, lora_dropout=0.0, load_in_4bit=True, lr_scheduler_type="constant")  # fmt: skip
    sft.train(sft.SFTConfig(output_dir=str(tmp_path / "whole"), save_steps=0, **shared))
    whole = read_losses(tmp_path / "whole")
    assert len(whole) == 4 and whole[-1] < whole[0]
    assert (tmp_path / "whole" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "whole" / "model.safetensors").exists()

    first = tmp_path / "resumed"
    sft.train(sft.SFTConfig(output_dir=str(first), save_steps=2, **{**shared, "max_steps": 2}))
    saved = sorted(p.name for p in (first / "checkpoint-2").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    sft.train(sft.SFTConfig(output_dir=str(first), save_steps=2, resume_from_checkpoint="latest", **shared))
    assert read_losses(first) == pytest.approx(whole, rel=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use_peft": True, "load_in_4bit": True, "load_in_8bit": True}, r"load_in_4bit=true and load_in_8bit=true: choose one"),
        ({"load_in_4bit": True}, r"load_in_4bit=true without use_peft: quantized weights cannot be trained"),
        ({"use_peft": True, "load_in_8bit": True, "merge_adapter": True}, r"merge_adapter=true with load_in_8bit=true"),
        ({"use_peft": True, "bnb_4bit_quant_type": "int4"}, r"bnb_4bit_quant_type must be one of nf4, fp4, got 'int4'"),
    ],
)  # fmt: skip
def test_bad_quantization_options_are_named(cpu_allowed, options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_quantization_off_cuda_is_refused_by_name():
    with pytest.raises(
        ConfigError, match=r"load_in_4bit=true needs a CUDA GPU \(bitsandbytes' quantized weights\)"
    ):
        TrainConfig(use_peft=True, load_in_4bit=True)


def test_missing_bitsandbytes_names_the_extra(cpu_allowed, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(
        ConfigError, match=r"load_in_8bit=true needs bitsandbytes: pip install 'posttrain\[qlora\]'"
    ):
        TrainConfig(use_peft=True, load_in_8bit=True)


def test_the_embedded_model_cannot_be_quantized(cpu_allowed):
    config = qlora(load_in_4bit=True)
    with pytest.raises(
        ValueError, match=r"quantize a pretrained checkpoint as it loads.*pass --model_name_or_path"
    ):
        models.load_causal_lm(None, quantization=lora.quantization(cpu_run(config)))


def test_four_bit_computes_in_the_runs_dtype(cpu_allowed):
    # the run's resolved bf16 (none means "when the device has it"), not the option as given
    config = qlora(load_in_4bit=True)
    assert config.bf16 is None
    bnb = lora.quantization(cpu_run(config, bf16=True))["quantization_config"]
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16 == bnb.bnb_4bit_quant_storage
    assert lora.quantization(cpu_run(config))["quantization_config"].bnb_4bit_compute_dtype == torch.float32


def test_sft_of_the_embedded_model_refuses_quantization_before_the_run_folder(cpu_allowed, tmp_path):
    with pytest.raises(
        ConfigError, match=r"quantize a pretrained checkpoint as it loads.*--model_name_or_path"
    ):
        sft.SFTConfig(use_peft=True, load_in_4bit=True, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
