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


def test_tensor_peak_is_the_high_water_mark_of_tensors_made_while_open():
    """Tensors alive on entry do not count, freed ones count while they lived: two 1 MiB tensors alive together,
    then one more after both are gone, peak at 2 MiB (within the few bytes of any bookkeeping tensor)."""
    import torch

    before = torch.empty(2**20)  # 4 MiB, alive on entry: not counted
    with measure.TensorPeak() as peak:
        a, b = torch.empty(2**18), torch.empty(2**18)
        del a, b
        c = torch.empty(2**18)
        del before
    assert peak.mib == pytest.approx(2.0, abs=0.01)
    del c
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2**18))])
    optimizer.param_groups[0]["params"][0].grad = torch.ones(2**18)
    optimizer.step()
    assert measure.optimizer_state_mib(optimizer) == pytest.approx(
        2.0, abs=0.01
    )  # the moments, and a step count
