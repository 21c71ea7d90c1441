"""Shared by the tests of rl/lean.py's parts (test_swiglu.py, test_rmsnorm.py, test_rope.py)."""

import contextlib

import torch


def run(model, context=None, mask: bool = False, count_saved: bool = True):
    """(logits, every parameter's gradient, bytes of the activations autograd saved) of a random combination of
    the logits of 3 rows of 17 random ids (with `mask`, the first row left-padded by 5), the forward under
    `context`. The bytes are counted through a saved-tensors hook; `count_saved=False` runs without one (0
    bytes), as training does."""
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (3, 17), generator=g)
    attention_mask = torch.ones_like(ids)
    if mask:
        attention_mask[0, :5] = 0
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        if count_saved
        else contextlib.nullcontext()
    )
    with hooks, context or contextlib.nullcontext():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits
    (logits * torch.randn(logits.shape, generator=g)).sum().backward()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for ptr, n in saved.items() if ptr not in weights)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, activations


def bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (float32), -0.0 and +0.0 told apart."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def training_forward_calls(monkeypatch, function) -> tuple[int, int]:
    """Calls of the autograd Function `function` (a spy on its apply) in `token_logprobs`'s forward and backward
    on a 2-layer embedded model, and the count after one more forward without autograd (the same where the
    lean parts stand aside there)."""
    from posttrain.data import embedded
    from posttrain.rl import logprobs

    calls = []
    real = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or real(*a))
    model = embedded.build_model(seed=0, num_hidden_layers=2)
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "completion_mask": torch.tensor([[0, 0, 1, 1]])}
    logprobs.token_logprobs(model, batch).logps.sum().backward()
    trained = len(calls)
    with torch.no_grad():
        logprobs.token_logprobs(model, batch)
    return trained, len(calls)
