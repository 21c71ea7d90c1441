"""SFT losses and the loss registry, against plain per-token loops."""

import math

import pytest
import torch

from posttrain.losses import registry


def test_nll_is_token_mean_over_the_step():
    logps = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, -5.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    # 3 target tokens in this micro-batch, 6 in the whole step: (1 + 2 + 3) / 6 = 1.0
    loss = registry.get("sft", "nll")(logps, mask, torch.tensor(6))
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -1 / 6, -1 / 6], [0.0, -1 / 6, 0.0]]))


def test_dft_weights_each_token_by_its_detached_probability():
    logps = torch.tensor([[0.0, math.log(0.5), math.log(0.25)]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1]])
    loss = registry.get("sft", "dft")(logps, mask, 2)
    expected = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25)) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # the weight is a constant: d/dlogp of -(w * logp) / 2 is -w / 2
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.25, -0.125]]))


def test_step_without_targets_is_a_finite_zero():
    logps = torch.zeros(2, 3, requires_grad=True)
    loss = registry.get("sft", "nll")(logps, torch.zeros(2, 3), torch.tensor(0))
    assert loss.item() == 0.0


def test_registry_lists_valid_names_and_refuses_a_conflicting_registration():
    with pytest.raises(ValueError, match=r"unknown sft loss_type 'nope'; expected one of \['dft', 'nll'\]"):
        registry.get("sft", "nope")
    with pytest.raises(ValueError, match="sft loss 'nll' is already registered by posttrain.losses.sft.nll"):
        registry.register("sft", "nll")(lambda logps, mask, num_items: logps.sum())
