"""A sequence classifier's score at each row's last token, with the last layer run at that token only.

Notation: n rows, T positions, H hidden, h_q / h_kv query and key-value heads, D head dim.

A reward model reads one position per row: the score head at the last token that is not padding. Through
the last decoder layer only that position's hidden state matters, and it needs the other positions only as
keys and values. `sequence_scores` therefore runs the backbone's first L - 1 layers as the model does, then
the last layer as

    x = input_layernorm(h)                                  (n, T, H): every position, for keys and values
    k, v = x W_k^T, x W_v^T; q = x[last] W_q^T              Qwen3: the per-head q / k norms
    q, k = rope(q), rope(k)
    a = SDPA(q, k, v), keys j <= last with attention_mask 1 (n, h_q, 1, D)
    h = h[last] + a W_o^T; h = h + mlp(post_attention_layernorm(h))     at the last token only
    score = score_head(norm(h))                             (n, num_labels)

On the reward benchmark's model (4 layers) that drops 23 % of the step's matmuls, and the activations
the last layer's attention output, MLP and final norm would keep for every position. The modules are the
model's own, called as modules, the same ops in the same order; only the row sets of the last layer's
matmuls shrink, so scores and gradients agree with the model's forward to float32 rounding
(tests/test_last_token.py).

`supports(model)` says where it applies: a Llama / Mistral / Qwen2 / Qwen3 sequence classifier built by
transformers, unwrapped (no peft, DDP or FSDP wrapper), not compiled (`torch_compile` compiles the backbone,
whose graph would not see the swap), SDPA attention, no gradient checkpointing, no attention dropout in
training, its last layer full attention, no forward or backward hook on the model, its backbone, final norm
or last layer (transformers' own hooks for `output_hidden_states` / `output_attentions` stay on the layers
once asked for, and count). Anything else takes the model's forward. The swap is not thread-safe: one model,
one forward at a time, as training does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.rl.decode import rope
from posttrain.rl.stock import (
    backward_hooked,
    checkpointing,
    compiled,
    from_transformers,
    global_backward_hooks,
    global_hooks,
    intercepted,
)

FAMILIES = (
    "LlamaForSequenceClassification",
    "MistralForSequenceClassification",
    "Qwen2ForSequenceClassification",
    "Qwen3ForSequenceClassification",
)


def supports(model) -> bool:
    """`sequence_scores` may take the last-token path for `model` (see the module docstring)."""
    if type(model).__name__ not in FAMILIES or not from_transformers(model):
        return False
    inner, config = model.model, model.config
    if checkpointing(model) or any(compiled(m) for m in (model, inner)) or config.pad_token_id is None:
        return False
    # SDPA, as here: eager attention differs where a query sees no key (it averages them all), and a
    # registered kernel may compute anything
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if type(model).__name__ == "MistralForSequenceClassification" and config.sliding_window is not None:
        return False  # Mistral masks every layer by its window
    if (getattr(config, "layer_types", None) or ["full_attention"])[-1] != "full_attention":
        return False
    layer = inner.layers[-1]
    attn = layer.self_attn
    if attn.training and attn.attention_dropout:
        return False  # its dropout masks would be drawn for one query, not for T
    # modules whose forward is replaced, or that see (n, 1, H) in place of (n, T, H): nothing attached
    replaced = [model, inner, inner.norm, layer, attn] + (
        [attn.q_norm, attn.k_norm] if hasattr(attn, "q_norm") else []
    )
    return (
        all(from_transformers(m) and not intercepted(m) and not backward_hooked(m) for m in replaced)
        and not global_hooks()
        and not global_backward_hooks()
    )


def last_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(n,) the rightmost position whose token is not `pad_token_id` (0 if there is none): the token
    transformers' sequence classifiers score, whichever side the padding is on."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs) -> torch.Tensor:
    """(n, num_labels) `model`'s scores, as `model(input_ids, attention_mask, **inputs).logits` gives them;
    input_ids, attention_mask (n, T). The last layer at the last token where `supports(model)` and no other
    input (a tokenizer's token_type_ids, say) is given."""
    if inputs or not supports(model):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs).logits
    inner = model.model
    index = last_token_index(input_ids, model.config.pad_token_id)
    last = inner.layers[-1]
    inner.layers[-1] = _AtLastToken(last, index, attention_mask)
    try:
        hidden = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    finally:
        inner.layers[-1] = last
    return model.score(hidden[:, 0])


class _AtLastToken(torch.nn.Module):
    """Stands in for the backbone's last decoder layer during one forward: returns (n, 1, H), that layer's
    output at each row's `index` only."""

    def __init__(self, layer, index: torch.Tensor, attention_mask: torch.Tensor):
        super().__init__()
        self.layer, self.index, self.attention_mask = layer, index, attention_mask

    def forward(self, hidden_states, *args, position_embeddings, **kwargs):
        layer, index = self.layer, self.index
        attn, mlp = layer.self_attn, layer.mlp
        n, T, _ = hidden_states.shape
        rows = torch.arange(n, device=index.device)
        x = layer.input_layernorm(hidden_states)  # (n, T, H)
        q = attn.q_proj(x[rows, index]).view(n, 1, -1, attn.head_dim)  # (n, 1, h_q, D)
        k = attn.k_proj(x).view(n, T, -1, attn.head_dim)  # (n, T, h_kv, D)
        v = attn.v_proj(x).view(n, T, -1, attn.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = (t.expand(n, T, t.shape[-1]) for t in position_embeddings)  # (n, T, D)
        q = rope(q, cos[rows, index][:, None, None], sin[rows, index][:, None, None])
        k = rope(k, cos[:, :, None], sin[:, :, None])
        # the keys the model's causal, padded mask gives the last token's query
        keys = torch.arange(T, device=index.device)
        allowed = (keys <= index[:, None]) & self.attention_mask.bool()  # (n, T)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=allowed[:, None, None],
            scale=attn.scaling,
            enable_gqa=True,
        )  # (n, h_q, 1, D)
        h = hidden_states[rows, index] + attn.o_proj(a.reshape(n, -1))  # (n, H)
        h = h + mlp(layer.post_attention_layernorm(h))
        return h[:, None]
