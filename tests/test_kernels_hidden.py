"""Fused linear + log-softmax + gather (posttrain/kernels/hidden.py) against the float64 reference.

Notation: N rows, V vocabulary, H hidden size, B batch, T time. Both backends run here: the torch path
directly; the Triton path on CUDA copies when a GPU exists, else on the CPU through the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton), on tiny shapes because the
interpreter is slow.
"""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import posttrain.kernels.hidden as K
from posttrain.kernels import logprobs_from_hidden
from posttrain.kernels.hidden import logprobs_from_hidden_torch, reference_logprobs_from_hidden

CUDA = torch.cuda.is_available()
TRITON_OK = K.triton is not None and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(
    not TRITON_OK, reason="triton missing, or neither a GPU nor TRITON_INTERPRET=1"
)


def _backends():
    return ["torch", pytest.param("triton", marks=needs_triton)]


# Small tiles on the torch path so every test crosses several row and vocabulary tiles.
def _torch_small(*args, **kw):
    return K.logprobs_from_hidden_torch(*args, rows_per_tile=2, vocab_per_tile=16, **kw)


def _triton_on_device(hidden, weight, index, *, bias=None, mask=None, **kw):
    """The Triton path on CUDA copies when a GPU exists (outputs back on the CPU, gradients flow to the CPU
    tensors), else directly on the CPU through the interpreter."""
    kw = dict(rows_per_tile=2, vocab_per_tile=48) | kw  # every test crosses row and vocabulary tiles
    if not CUDA:
        return K.logprobs_from_hidden_triton(hidden, weight, index, bias=bias, mask=mask, **kw)
    out = K.logprobs_from_hidden_triton(
        hidden.cuda(),
        weight.cuda(),
        index.cuda(),
        bias=None if bias is None else bias.cuda(),
        mask=None if mask is None else mask.cuda(),
        **kw,
    )
    return out.cpu() if isinstance(out, torch.Tensor) else tuple(o.cpu() for o in out)


def _fn(backend):
    return _torch_small if backend == "torch" else _triton_on_device


# Max abs error allowed on (logps, entropy) and the relative (to max |ref|) error on gradients, per dtype.
# bf16/fp16 logits are rounded once (the matmul runs in the input dtype), and so is dz before the
# gradient matmuls; the reference is float64 math on the same (rounded) inputs.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (8e-2, 3e-2),
    torch.float16: (1e-2, 4e-3),
}


def _inputs(N, V, H, dtype, *, bias, seed=0, scale=1.0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (N,) if lead is None else lead
    hidden = (torch.randn(*shape, H, generator=g) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    index = torch.randint(0, V, shape, generator=g)
    index.view(-1)[0] = V - 1  # a target in the last (partial) vocabulary tile / Triton split
    return hidden, weight, b, index


def _check(out, ref, params, ref_params, dtype, *, seed=1, gtol=None):
    """Compare (logps, entropy) values, then gradients of a random combination of both."""
    atol, gtol = TOL[dtype][0], gtol or TOL[dtype][1]
    for got, want in zip(out, ref, strict=True):
        assert got.dtype == torch.float32
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-5)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g) for o in out]
    loss = sum((o * w).sum() for o, w in zip(out, weights, strict=True))
    ref_loss = sum((o * w.double()).sum() for o, w in zip(ref, weights, strict=True))
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    for name, got, want in zip(("dhidden", "dweight", "dbias"), grads, ref_grads, strict=False):
        assert got.dtype == dtype, name
        assert torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)
        assert err < gtol, f"{name}: relative error {err:.2e}"


OPTIONS = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=1.6, logit_scale=0.5),
    dict(softcap=2.0),
    dict(softcap=3.0, temperature=0.9, logit_scale=2.0),
]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Every dtype x H on the torch path; on the (slow) interpreter one odd-H run, in float32.
GRID = [("torch", d, H) for d in DTYPES for H in (17, 32)] + [("triton", d, 32) for d in DTYPES]
GRID.append(("triton", torch.float32, 17))


@pytest.mark.parametrize(("backend", "dtype", "H"), GRID, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_values_and_grads_match_float64_reference(backend, dtype, H, opts):
    if backend == "triton" and not TRITON_OK:
        pytest.skip("triton missing, or neither a GPU nor TRITON_INTERPRET=1")
    bias = "softcap" in opts or opts == {}
    hidden, weight, b, index = _inputs(3, 123, H, dtype, bias=bias)
    params = [hidden, weight] + ([b] if bias else [])
    ref_params = [p.detach().double().requires_grad_() for p in params]
    rh, rw = ref_params[:2]
    rb = ref_params[2] if bias else None
    out = _fn(backend)(hidden, weight, index, bias=b, return_entropy=True, **opts)
    ref = reference_logprobs_from_hidden(rh, rw, index, bias=rb, return_entropy=True, **opts)
    _check(out, ref, params, ref_params, dtype)


@pytest.mark.parametrize("backend", _backends())
def test_logps_only_gradient_and_top1(backend):
    hidden, weight, b, index = _inputs(5, 40, 16, torch.float32, bias=True, seed=3)
    # make rows 0 and 3 pick their arg-max so both answers of is_top1 occur
    with torch.no_grad():
        z = hidden @ weight.T + b
        index[0] = z[0].argmax()
        index[3] = z[3].argmax()
    logps, is_top1 = _fn(backend)(hidden, weight, index, bias=b, return_top1=True)
    ref_logps, ref_top1 = reference_logprobs_from_hidden(
        hidden.detach(), weight.detach(), index, bias=b.detach(), return_top1=True
    )
    assert is_top1.dtype == torch.bool and not is_top1.requires_grad
    assert is_top1.tolist() == ref_top1.tolist()
    assert is_top1[0] and is_top1[3]
    torch.testing.assert_close(logps.double(), ref_logps, atol=2e-5, rtol=0)
    ref_params = [p.detach().double().requires_grad_() for p in (hidden, weight, b)]
    ref = reference_logprobs_from_hidden(*ref_params[:2], index, bias=ref_params[2])
    _check((logps,), (ref,), [hidden, weight, b], ref_params, torch.float32)


@pytest.mark.parametrize("backend", _backends())
def test_entropy_only_gradient(backend):
    hidden, weight, _, index = _inputs(4, 50, 16, torch.float32, bias=False, seed=4)
    _, entropy = _fn(backend)(hidden, weight, index, return_entropy=True, softcap=1.5)
    rh, rw = (p.detach().double().requires_grad_() for p in (hidden, weight))
    _, ref_entropy = reference_logprobs_from_hidden(rh, rw, index, return_entropy=True, softcap=1.5)
    _check((entropy,), (ref_entropy,), [hidden, weight], [rh, rw], torch.float32)


@pytest.mark.parametrize("backend", _backends())
def test_masked_rows_are_zero_and_get_no_gradient(backend):
    hidden, weight, b, index = _inputs(6, 37, 16, torch.float32, bias=True, seed=5)
    index[1] = 10_000  # out of range, but masked: must be ignored
    mask = torch.tensor([True, False, True, True, False, True])
    logps, entropy, is_top1 = _fn(backend)(
        hidden, weight, index, bias=b, mask=mask, return_entropy=True, return_top1=True
    )
    safe = index.clamp(max=36)
    ref = reference_logprobs_from_hidden(
        hidden.detach(), weight.detach(), safe, bias=b.detach(), mask=mask, return_entropy=True
    )
    torch.testing.assert_close(logps.double(), ref[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref[1], atol=2e-5, rtol=0)
    assert logps[~mask].eq(0).all() and entropy[~mask].eq(0).all() and not is_top1[~mask].any()
    (logps.sum() + entropy.sum()).backward()
    assert hidden.grad[~mask].eq(0).all()
    assert hidden.grad[mask].abs().sum() > 0

    # all rows masked: zeros, zero gradient, no error
    hidden.grad = None
    none = torch.zeros(6, dtype=torch.bool)
    logps = _fn(backend)(hidden, weight, index, bias=b, mask=none)
    assert logps.eq(0).all()
    logps.sum().backward()
    assert hidden.grad.eq(0).all()


@pytest.mark.parametrize("backend", _backends())
def test_leading_shape_and_non_contiguous_input(backend):
    B, T, H, V = 2, 3, 16, 29
    g = torch.Generator().manual_seed(6)
    base = torch.randn(T, B, H, generator=g, requires_grad=True)
    hidden = base.transpose(0, 1)  # (B, T, H), not contiguous
    assert not hidden.is_contiguous()
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    index = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    logps, entropy = _fn(backend)(hidden, weight, index, mask=mask, return_entropy=True)
    assert logps.shape == entropy.shape == (B, T)
    rb, rw = (p.detach().double().requires_grad_() for p in (base, weight))
    ref = reference_logprobs_from_hidden(rb.transpose(0, 1), rw, index, mask=mask, return_entropy=True)
    _check((logps, entropy), ref, [base, weight], [rb, rw], torch.float32)


@pytest.mark.parametrize("backend", _backends())
def test_extreme_hidden_values_stay_finite(backend):
    # logits of size ~1e4: the softmax is one-hot, logps are large negative numbers, nothing is NaN
    hidden, weight, b, index = _inputs(4, 45, 16, torch.float32, bias=True, seed=7, scale=3e3)
    with torch.no_grad():
        hidden[0] = 0.0  # a uniform row next to saturated ones
    out = _fn(backend)(hidden, weight, index, bias=b, return_entropy=True, return_top1=True)
    ref = reference_logprobs_from_hidden(
        hidden.detach(), weight.detach(), index, bias=b.detach(), return_entropy=True, return_top1=True
    )
    for got in out[:2]:
        assert torch.isfinite(got).all()
    torch.testing.assert_close(out[0].double(), ref[0], rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(out[1].double(), ref[1], rtol=1e-4, atol=1e-3)
    assert out[2].tolist() == ref[2].tolist()
    (out[0].sum() + out[1].sum()).backward()
    for p in (hidden, weight, b):
        assert torch.isfinite(p.grad).all()

    # softcap bounds the logits, so even huge hidden values give a smooth distribution
    hidden.grad = None
    logps = _fn(backend)(hidden, weight, index, bias=b, softcap=5.0)
    rp = [p.detach().double().requires_grad_() for p in (hidden, weight, b)]
    ref = reference_logprobs_from_hidden(rp[0], rp[1], index, bias=rp[2], softcap=5.0)
    # float32 logits of size 1e4 carry absolute errors ~1e-3 into tanh's saturated derivative: looser gtol
    _check((logps,), (ref,), [hidden, weight, b], rp, torch.float32, gtol=1e-3)


@pytest.mark.parametrize("backend", _backends())
def test_frozen_weight_computes_no_weight_gradient(backend):
    hidden, weight, _, index = _inputs(4, 64, 16, torch.float32, bias=False, seed=8)
    weight.requires_grad_(False)
    # on a GPU, copy to it first so the recorder below only sees the kernel's own allocations
    dev = "cuda" if backend == "triton" and CUDA else "cpu"
    fn = _torch_small if backend == "torch" else K.logprobs_from_hidden_triton
    h_dev, w_dev, i_dev = hidden.to(dev), weight.to(dev), index.to(dev)
    with _Recorder() as rec:
        logps = fn(h_dev, w_dev, i_dev).cpu()
        logps.sum().backward()
    assert weight.grad is None
    # no op produced a (V, H) result: the float32 dweight accumulator was never allocated
    # (aten.set_ is the Triton interpreter re-binding the weight argument's storage and aten.slice a view of
    # the weight's one vocabulary tile: neither is a new tensor)
    made = [
        op for op, shape in rec.shapes if shape == (64, 16) and not any(v in op for v in ("set_", "slice"))
    ]
    assert not made, made
    rh = hidden.detach().double().requires_grad_()
    ref = reference_logprobs_from_hidden(rh, weight.double(), index)
    (ref_g,) = torch.autograd.grad(ref.sum(), rh)
    torch.testing.assert_close(hidden.grad.double(), ref_g, atol=1e-5, rtol=1e-5)


@needs_triton
def test_dispatch_reaches_the_triton_path():
    hidden, weight, b, index = _inputs(3, 40, 16, torch.float32, bias=True, seed=13)
    dev = "cuda" if CUDA else "cpu"
    got = logprobs_from_hidden(
        hidden.to(dev), weight.to(dev), index.to(dev), bias=b.to(dev), softcap=2.0, backend="triton"
    ).cpu()
    ref = reference_logprobs_from_hidden(
        hidden.detach(), weight.detach(), index, bias=b.detach(), softcap=2.0
    )
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=0)


@needs_triton
def test_triton_path_rejects_float64():
    hidden, weight, _, index = _inputs(2, 20, 16, torch.float64, bias=False)
    with pytest.raises(ValueError, match="triton backend takes float32/bfloat16/float16 hidden and weight"):
        K.logprobs_from_hidden_triton(hidden, weight, index)


# ----------------------------------------------------------------------------------------------------------
# Torch path only: real vocabulary sizes, gradcheck, the memory bound, default tiles.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("N", "V", "H"), [(47, 32000, 32), (3, 151936, 16)])
def test_torch_path_real_vocabulary_sizes(N, V, H):
    hidden, weight, b, index = _inputs(N, V, H, torch.float32, bias=(V == 32000), seed=9)
    index[0] = V - 1  # target in the last, partial vocabulary tile
    params = [hidden, weight] + ([b] if b is not None else [])
    ref_params = [p.detach().double().requires_grad_() for p in params]
    rb = ref_params[2] if b is not None else None
    # default tile sizes here: the vocabulary is cut in several tiles with a ragged last one
    out = logprobs_from_hidden_torch(hidden, weight, index, bias=b, return_entropy=True, temperature=0.8)
    ref = reference_logprobs_from_hidden(
        ref_params[0], ref_params[1], index, bias=rb, return_entropy=True, temperature=0.8
    )
    # one tile spans up to 150k columns here: float32 sums that long carry ~1e-5 relative error
    _check(out, ref, params, ref_params, torch.float32, gtol=1e-4)


@pytest.mark.parametrize(
    "opts",
    [
        dict(softcap=3.0, temperature=0.8, logit_scale=1.2),
        dict(temperature=1.3),
    ],
)
def test_torch_path_gradcheck_float64(opts):
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 11, (4,), generator=g)
    mask = torch.tensor([True, True, False, True])

    def f(h, w, b):
        return logprobs_from_hidden_torch(
            h, w, index, bias=b, mask=mask, return_entropy=True, rows_per_tile=3, vocab_per_tile=4, **opts
        )

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


class _Recorder(TorchDispatchMode):
    """Records the output shape of every aten op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.shapes.append((str(func), tuple(o.shape)))
        return out


def test_torch_path_never_builds_the_logits():
    # N V = 512k elements; the biggest tensors allowed are a (64, 1024) tile and the (V, H) dweight.
    N, V, H = 128, 4096, 4
    hidden, weight, b, index = _inputs(N, V, H, torch.float32, bias=True, seed=11)
    with _Recorder() as rec:
        logps, entropy = logprobs_from_hidden_torch(
            hidden,
            weight,
            index,
            bias=b,
            return_entropy=True,
            softcap=4.0,
            rows_per_tile=64,
            vocab_per_tile=1024,
        )
        (logps.sum() + entropy.sum()).backward()
    biggest = max(torch.Size(s).numel() for _, s in rec.shapes)
    assert biggest <= max(64 * 1024, V * H), [
        (op, s) for op, s in rec.shapes if torch.Size(s).numel() == biggest
    ]
    assert len(rec.shapes) > 100  # the recorder did see the ops

    # the check can fail: the naive computation trips it
    with _Recorder() as rec:
        torch.log_softmax(hidden @ weight.T, -1)
    assert max(torch.Size(s).numel() for _, s in rec.shapes) == N * V


def test_torch_path_rejects_bad_tile_sizes():
    hidden, weight, _, index = _inputs(2, 20, 8, torch.float32, bias=False)
    with pytest.raises(ValueError, match="rows_per_tile and vocab_per_tile must be >= 1; got 0, 16"):
        logprobs_from_hidden_torch(hidden, weight, index, rows_per_tile=0, vocab_per_tile=16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", _backends())
def test_default_tiles_match_the_float64_reference(backend, dtype):
    """One row tile at the default sizes: a 16-bit weight's gradient is then a single product written straight
    into dweight (rounded once), float32 ones accumulate in place."""
    hidden, weight, b, index = _inputs(9, 300, 24, dtype, bias=True, seed=12)
    params = [hidden, weight, b]
    ref_params = [p.detach().double().requires_grad_() for p in params]
    got = logprobs_from_hidden(hidden, weight, index, bias=b, backend=backend, return_entropy=True)
    ref = reference_logprobs_from_hidden(*ref_params[:2], index, bias=ref_params[2], return_entropy=True)
    _check(got, ref, params, ref_params, dtype)


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: every message names the offending argument.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(weight=torch.zeros(10, 8, 1)), r"weight must be \(V, H\)"),
        (dict(hidden=torch.zeros(3, 7)), r"hidden \(\.\.\., H\) must end with H = weight.shape\[1\] = 8"),
        (dict(index=torch.zeros(4, dtype=torch.long)), r"index shape \(4,\) must equal"),
        (dict(index=torch.zeros(3)), "index must be an integer tensor"),
        (dict(index=torch.tensor([0, 10, 2])), r"index out of range \[0, 10\) at flattened row 1: 10"),
        (dict(index=torch.tensor([0, -1, 2])), r"index out of range \[0, 10\) at flattened row 1: -1"),
        (
            dict(index=torch.tensor([10, 1, 12]), mask=torch.tensor([False, True, True])),
            r"index out of range \[0, 10\) at flattened row 2: 12",
        ),
        (
            dict(weight=torch.zeros(10, 8, dtype=torch.float64)),
            "hidden and weight must share one floating dtype",
        ),
        (dict(bias=torch.zeros(9)), r"bias must be \(V,\) = \(10,\)"),
        (dict(mask=torch.ones(2, dtype=torch.bool)), r"mask shape \(2,\) must equal index shape \(3,\)"),
        (dict(temperature=0.0), "temperature must be > 0; got 0.0"),
        (dict(logit_scale=-1.0), "logit_scale must be > 0; got -1.0"),
        (dict(softcap=0.0), "softcap must be > 0 or None; got 0.0"),
    ],
)
def test_bad_inputs_name_the_argument(backend, change, match):
    if backend == "triton" and not TRITON_OK:
        pytest.skip("triton missing, or neither a GPU nor TRITON_INTERPRET=1")
    args = dict(hidden=torch.zeros(3, 8), weight=torch.zeros(10, 8), index=torch.tensor([0, 1, 2]))
    args.update(change)
    hidden, weight, index = args.pop("hidden"), args.pop("weight"), args.pop("index")
    with pytest.raises(ValueError, match=match):
        _fn(backend)(hidden, weight, index, **args)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("opts", [dict(temperature=0.9), dict(softcap=3.0)], ids=["plain", "softcap"])
def test_minus_inf_bias_columns(backend, opts):
    """A -inf bias removes vocabulary entries (p = 0 there; with a softcap they sit at -softcap instead, with a
    zero derivative): the whole first vocabulary tile, so the running max starts at -inf, and scattered columns.
    Values and the hidden, weight and bias gradients stay finite and match the reference."""
    hidden, weight, b, index = _inputs(5, 123, 16, torch.float32, bias=True, seed=21)
    with torch.no_grad():
        b[:48] = float("-inf")  # the first tile (vocab_per_tile 16 / 48 in these tests) and more
        b[70:123:7] = float("-inf")
    index[:] = torch.tensor([50, 60, 121, 100, 49])
    params = [hidden, weight, b]
    ref_params = [p.detach().double().requires_grad_() for p in params]
    out = _fn(backend)(hidden, weight, index, bias=b, return_entropy=True, **opts)
    ref = reference_logprobs_from_hidden(
        *ref_params[:2], index, bias=ref_params[2], return_entropy=True, **opts
    )
    _check(out, ref, params, ref_params, torch.float32)


@pytest.mark.parametrize("backend", _backends())
def test_autocast_runs_the_matmuls_in_the_autocast_dtype(backend):
    """Under bf16 autocast the tiles are the bf16 logits an autocast `lm_head` computes; log-probs, entropy and
    the gradients (float32, the parameters' dtype) match the float64 reference taken on those logits."""
    from posttrain.kernels.logits import reference_logprobs_from_logits

    hidden, weight, _, index = _inputs(6, 200, 32, torch.float32, bias=False, seed=22)
    fn = _torch_small if backend == "torch" else _triton_on_device
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(hidden, weight, index, return_entropy=True)
        rh, rw = (p.detach().clone().requires_grad_() for p in (hidden, weight))
        logits = torch.nn.functional.linear(rh, rw)  # (6, 200) bf16
    assert logits.dtype == torch.bfloat16
    ref = reference_logprobs_from_logits(logits, index, return_entropy=True)
    exact = reference_logprobs_from_hidden(hidden.detach(), weight.detach(), index)
    assert (out[0].double() - exact).abs().max() > 1e-4  # not the float32 logits
    for got, want in zip(out, ref, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    w = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    (out[0] * w[0] + out[1] * w[1]).sum().backward()
    (ref[0] * w[0].double() + ref[1] * w[1].double()).sum().backward()
    for got, want in ((hidden.grad, rh.grad), (weight.grad, rw.grad)):
        assert got.dtype == torch.float32
        # both round dL/dlogits to bf16 before the gradient matmuls; ours sums the products in float32
        assert (got - want).abs().max() / want.abs().max() < 1e-2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_cuda_tiles_several_row_and_vocabulary_tiles(dtype):
    """On a GPU at the default tiles (4096 x 8192): N and V past one tile each, ragged, entropy and its gradient."""
    hidden, weight, b, index = _inputs(4096 + 999, 3 * 8192 + 77, 64, dtype, bias=True, seed=23)
    params = [hidden, weight, b]
    ref_params = [p.detach().double().requires_grad_() for p in params]
    out = K.logprobs_from_hidden_triton(
        *(p.cuda() for p in params[:2]), index.cuda(), bias=b.cuda(), return_entropy=True
    )
    out = tuple(o.cpu() for o in out)
    ref = reference_logprobs_from_hidden(*ref_params[:2], index, bias=ref_params[2], return_entropy=True)
    _check(out, ref, params, ref_params, dtype)
