"""Backend dispatch of posttrain.kernels: which implementation each call reaches, and the named errors of a forced
backend that cannot run the call.

`choose_backend` is the whole decision, a pure function of (requested, env, device type, dtype, triton importable,
interpreter on); its table is checked case by case. Then the two public entry points for every device x dtype x
requires_grad: the implementation they reach, and its result against the float64 reference. Without a GPU the
"cuda" device is faked (`_device_type` reports CPU tensors as CUDA ones) and the Triton kernels run under the
interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with one, the tensors are real CUDA tensors.
"""

import os

import pytest
import torch

import posttrain.kernels as kernels
import posttrain.kernels.hidden as HK
import posttrain.kernels.logits as L
from posttrain.kernels import choose_backend

CUDA = torch.cuda.is_available()
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPES = [F32, BF16, F16, F64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]
needs_triton = pytest.mark.skipif(
    not kernels._triton_available() or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="triton missing, or neither a GPU nor TRITON_INTERPRET=1",
)

# What an unforced call gets, written out: Triton only for a CUDA tensor of a dtype its kernels take.
DEFAULT = {
    ("cuda", F32): "triton",
    ("cuda", BF16): "triton",
    ("cuda", F16): "triton",
    ("cuda", F64): "torch",
    ("cpu", F32): "torch",
    ("cpu", BF16): "torch",
    ("cpu", F16): "torch",
    ("cpu", F64): "torch",
}


def decide(requested=None, env=None, device="cuda", dtype=F32, *, available=True, interpreting=False):
    return choose_backend(
        requested, env, device, dtype, triton_available=available, interpreting=interpreting
    )


# ----------------------------------------------------------------------------------------------------
# The decision table
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_unforced_choice(device, dtype):
    assert decide(device=device, dtype=dtype) == DEFAULT[device, dtype]
    # the interpreter is for forced runs only: it never makes the CPU default Triton
    assert decide(device=device, dtype=dtype, interpreting=True) == DEFAULT[device, dtype]
    assert decide(device=device, dtype=dtype, available=False) == "torch"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_forced_torch_serves_everything(device, dtype):
    for available in (True, False):
        assert decide("torch", None, device, dtype, available=available) == "torch"
        assert decide(None, "torch", device, dtype, available=available) == "torch"
        assert decide("torch", "triton", device, dtype, available=available) == "torch"  # argument beats env


@pytest.mark.parametrize("how", ["argument", "env"])
def test_forced_triton(how):
    def forced(device, dtype, **kw):
        return (
            decide("triton", None, device, dtype, **kw)
            if how == "argument"
            else decide(None, "triton", device, dtype, **kw)
        )

    for dtype in (F32, BF16, F16):
        assert forced("cuda", dtype) == "triton"
        assert forced("cpu", dtype, interpreting=True) == "triton"
        with pytest.raises(RuntimeError, match=r"backend 'triton' on a cpu tensor needs TRITON_INTERPRET=1"):
            forced("cpu", dtype)
        with pytest.raises(RuntimeError, match=r"backend 'triton' was forced but triton cannot be imported"):
            forced("cuda", dtype, available=False)
    for device, interpreting in (("cuda", False), ("cpu", True)):
        with pytest.raises(
            TypeError,
            match=r"backend 'triton' was forced but it does not serve torch.float64.*use backend='torch'",
        ):
            forced(device, F64, interpreting=interpreting)


def test_unknown_backend_names_its_source():
    with pytest.raises(ValueError, match=r"POSTTRAIN_KERNEL_BACKEND='cuda' is not a kernel backend"):
        decide(None, "cuda")
    with pytest.raises(
        ValueError, match=r"backend='fast' is not a kernel backend; expected one of \('triton', 'torch'\)"
    ):
        decide("fast", "torch")


# ----------------------------------------------------------------------------------------------------
# The entry points: the implementation reached and its numbers, per device x dtype x requires_grad
# ----------------------------------------------------------------------------------------------------


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name.rsplit("_", 1)[1])  # "torch" | "triton"
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def _on(device, monkeypatch):
    """The torch.device the tensors live on; without a GPU, "cuda" is the CPU with the device type faked."""
    if device == "cuda" and not CUDA:
        monkeypatch.setattr(kernels, "_device_type", lambda tensor: "cuda")
        return torch.device("cpu")
    return torch.device(device)


# (logps and entropy atol, gradient atol relative to max |ref|) per dtype, about 3x the errors measured on these
# cases. The logits path reads 16-bit logits exactly and rounds only its gradient; the hidden path also rounds
# its logits tiles to the 16-bit dtype (as the model's lm_head would), so its 16-bit results sit ~ulp(|z|) from
# the float64 reference. The tight numerics are in test_kernels_logits.py and test_kernels_hidden.py; here a
# wrong implementation or a lost gradient must fail.
# Every output but is_top1 (tested in the kernel files), through the entry points' arguments
FLAGS = dict(return_entropy=True, return_mean_logit=True, return_log_sum_sq=True)
TOL = {
    "logits": {F64: (1e-10, 1e-10), F32: (4e-6, 1e-6), BF16: (4e-6, 1e-2), F16: (4e-6, 1e-3)},
    "hidden": {F64: (1e-10, 1e-10), F32: (4e-6, 1e-6), BF16: (4e-2, 2.5e-2), F16: (3e-3, 3e-3)},
}


@needs_triton
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_logits_entry_point(device, dtype, requires_grad, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_KERNEL_BACKEND", raising=False)
    calls = []
    _spy(monkeypatch, L, "logprobs_from_logits_torch", calls)
    _spy(monkeypatch, L, "logprobs_from_logits_triton", calls)
    dev = _on(device, monkeypatch)
    gen = torch.Generator().manual_seed(30)
    logits = (torch.randn(5, 37, generator=gen) * 2).to(dtype)
    index = torch.randint(0, 37, (5,), generator=gen)
    x = logits.to(dev, copy=True).requires_grad_(requires_grad)
    logps, entropy, mean_logit, log_sum_sq = kernels.logprobs_from_logits(
        x, index.to(dev), temperature=0.7, **FLAGS
    )
    assert calls == [DEFAULT[device, dtype]]

    ref_x = logits.double().requires_grad_()
    ref_logps, ref_entropy, ref_mean_logit, ref_log_sum_sq = L.reference_logprobs_from_logits(
        ref_x, index, temperature=0.7, **FLAGS
    )
    atol, gtol = TOL["logits"][dtype]
    torch.testing.assert_close(logps.cpu().double(), ref_logps.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(entropy.cpu().double(), ref_entropy.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(mean_logit.cpu().double(), ref_mean_logit.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(log_sum_sq.cpu().double(), ref_log_sum_sq.detach(), atol=atol, rtol=0)
    assert not mean_logit.requires_grad and not log_sum_sq.requires_grad
    assert logps.requires_grad == entropy.requires_grad == requires_grad
    if requires_grad:
        (logps.sum() + entropy.sum()).backward()
        (ref_logps.sum() + ref_entropy.sum()).backward()
        scale = ref_x.grad.abs().max().item()
        torch.testing.assert_close(x.grad.cpu().double(), ref_x.grad, atol=gtol * scale, rtol=0)


@needs_triton
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_hidden_entry_point(device, dtype, requires_grad, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_KERNEL_BACKEND", raising=False)
    calls = []
    _spy(monkeypatch, HK, "logprobs_from_hidden_torch", calls)
    _spy(monkeypatch, HK, "logprobs_from_hidden_triton", calls)
    dev = _on(device, monkeypatch)
    gen = torch.Generator().manual_seed(31)
    hidden = torch.randn(5, 8, generator=gen).to(dtype)
    weight = torch.randn(37, 8, generator=gen).to(dtype)
    index = torch.randint(0, 37, (5,), generator=gen)
    h = hidden.to(dev, copy=True).requires_grad_(requires_grad)
    w = weight.to(dev, copy=True).requires_grad_(requires_grad)
    logps, entropy, mean_logit, log_sum_sq = kernels.logprobs_from_hidden(
        h, w, index.to(dev), temperature=0.7, **FLAGS
    )
    assert calls == [DEFAULT[device, dtype]]

    ref_h, ref_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_logps, ref_entropy, ref_mean_logit, ref_log_sum_sq = HK.reference_logprobs_from_hidden(
        ref_h, ref_w, index, temperature=0.7, **FLAGS
    )
    atol, gtol = TOL["hidden"][dtype]
    torch.testing.assert_close(logps.cpu().double(), ref_logps.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(entropy.cpu().double(), ref_entropy.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(mean_logit.cpu().double(), ref_mean_logit.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(log_sum_sq.cpu().double(), ref_log_sum_sq.detach(), atol=atol, rtol=0)
    assert not mean_logit.requires_grad and not log_sum_sq.requires_grad
    assert logps.requires_grad == entropy.requires_grad == requires_grad
    if requires_grad:
        (logps.sum() + entropy.sum()).backward()
        (ref_logps.sum() + ref_entropy.sum()).backward()
        for got, ref in ((h.grad, ref_h.grad), (w.grad, ref_w.grad)):
            scale = ref.abs().max().item()
            torch.testing.assert_close(got.cpu().double(), ref, atol=gtol * scale, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Named errors of a forced Triton backend, through both entry points
# ----------------------------------------------------------------------------------------------------


def _call(entry, dtype=F32):
    gen = torch.Generator().manual_seed(32)
    index = torch.randint(0, 10, (3,), generator=gen)
    if entry == "logits":
        return lambda **kw: kernels.logprobs_from_logits(
            torch.randn(3, 10, generator=gen).to(dtype), index, **kw
        )
    hidden, weight = torch.randn(3, 4, generator=gen).to(dtype), torch.randn(10, 4, generator=gen).to(dtype)
    return lambda **kw: kernels.logprobs_from_hidden(hidden, weight, index, **kw)


@pytest.mark.parametrize("entry", ["logits", "hidden"])
def test_forced_triton_that_cannot_be_imported(entry, monkeypatch):
    monkeypatch.setattr(kernels, "_triton_available", lambda: False)
    call = _call(entry)
    with pytest.raises(RuntimeError, match=r"backend 'triton' was forced but triton cannot be imported"):
        call(backend="triton")
    monkeypatch.setenv("POSTTRAIN_KERNEL_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"backend 'triton' was forced but triton cannot be imported"):
        call()
    call(backend="torch")  # the argument still overrides the variable


@pytest.mark.parametrize("entry", ["logits", "hidden"])
def test_forced_triton_on_a_cpu_tensor_without_the_interpreter(entry, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend 'triton' on a cpu tensor needs TRITON_INTERPRET=1"):
        _call(entry)(backend="triton")


@pytest.mark.parametrize("entry", ["logits", "hidden"])
def test_forced_triton_on_float64(entry, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so the dtype, not the device, is what is refused
    monkeypatch.setattr(kernels, "_triton_available", lambda: True)
    with pytest.raises(TypeError, match=r"does not serve torch.float64.*use backend='torch'"):
        _call(entry, F64)(backend="triton")
