"""posttrain.measure's FLOP counts against a count position by position."""

import pytest
from transformers import Qwen2Config

from posttrain import measure


@pytest.mark.parametrize(
    "head_dim", [None, 6]
)  # None: H / heads = 4; 6: queries 24 wide (Qwen3 sets it apart)
@pytest.mark.parametrize("prompts, rows", [(1, 8), (4, 8), (8, 8)])
def test_shared_prompt_step_flops_counts_each_prompt_once(prompts, rows, head_dim):
    config = Qwen2Config(
        vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    if head_dim is not None:
        config.head_dim = head_dim
    P, C, L, H = 7, 5, 3, 16
    A = 4 * (head_dim or 4)  # the queries' width: heads x head_dim
    # forward + backward = 3 x forward; a forward: 2 FLOPs a weight a token, and per layer q K^T and P V
    # over the keys before the query (the causal half of the score matrix: position + 1/2 on average)
    positions = [p for _ in range(prompts) for p in range(P)] + [P + j for _ in range(rows) for j in range(C)]
    body = 3 * 2 * L * measure.linear_params_per_layer(config) * len(positions)
    attn = 3 * L * sum(2 * 2 * (p + 0.5) * A for p in positions)
    head = 3 * 2 * H * config.vocab_size * rows * C
    flops = measure.shared_prompt_step_flops(config, prompts, rows, P, C, head_tokens=rows * C)
    assert flops == pytest.approx({"body": body, "attn": attn, "head": head})
    if prompts == rows:  # nothing shared: the rows whole
        assert flops == pytest.approx(measure.step_flops(config, rows * (P + C), P + C, rows * C))
