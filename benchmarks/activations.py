"""Activation memory per token of a Qwen2 / Llama decoder layer, measured: the README's "Scaling up" formula.

    python benchmarks/activations.py

Counts the bytes autograd saves for the backward pass (`torch.autograd.graph.saved_tensors_hooks`, each storage
once, parameters left out) in a forward of two decoder layers under bf16 autocast with float32 weights (posttrain's
`--bf16 true`), SDPA attention, at two sequence lengths: the difference is the per-token cost, the rest is per
layer (autocast's bf16 copies of the weights the matmuls keep for the backward). Fits the per-token cost as
a*h + b*h_kv + c*I over a few shapes, with the layer's weights trained (full fine-tuning; LoRA saves about as
much: its adapters need the same inputs) and frozen.
"""

from __future__ import annotations

import torch

SHAPES = [(256, 1024, 4, 2), (256, 2048, 4, 2), (512, 1024, 8, 4), (512, 1024, 8, 8)]  # h, I, heads, kv heads
LAYERS = 2


def saved_bytes(model, T: int) -> float:
    """Bytes saved for backward per layer in a forward of one sequence of T tokens."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, model.config.vocab_size, (1, T))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        embeds = model.model.embed_tokens(x).detach().requires_grad_(True)
        model.model(inputs_embeds=embeds)
    return sum(seen.values()) / LAYERS


def main():
    from transformers import AutoModelForCausalLM, Qwen2Config

    rows = {True: [], False: []}
    for h, mlp, heads, kv in SHAPES:
        config = Qwen2Config(
            vocab_size=1000, hidden_size=h, intermediate_size=mlp, num_hidden_layers=LAYERS,
            num_attention_heads=heads, num_key_value_heads=kv, attn_implementation="sdpa",
        )  # fmt: skip
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        h_kv = h // heads * kv
        for trained in (True, False):
            model.requires_grad_(trained)
            short, long = saved_bytes(model, 128), saved_bytes(model, 256)
            per_token = (long - short) / 128
            per_layer = short - 128 * per_token
            weights = 2 * sum(p.numel() for p in model.model.layers[0].parameters())
            rows[trained].append(([h, h_kv, mlp], per_token))
            print(
                f"h {h} h_kv {h_kv} I {mlp} {'trained' if trained else 'frozen '}: {per_token:.0f} bytes per token "
                f"per layer; per layer {per_layer / 1e6:.2f} MB (its weights in bf16: {weights / 1e6:.2f} MB)"
            )
    for trained, data in rows.items():
        A = torch.tensor([x for x, _ in data], dtype=torch.float64)
        y = torch.tensor([b for _, b in data], dtype=torch.float64)
        a, b, c = torch.linalg.lstsq(A, y[:, None]).solution[:, 0].tolist()
        kind = "trained" if trained else "frozen"
        print(f"{kind}: bytes per token per layer ~ {a:.1f} h + {b:.1f} h_kv + {c:.1f} I")


if __name__ == "__main__":
    main()
