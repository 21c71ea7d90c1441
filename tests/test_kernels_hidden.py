"""Fused linear + log-softmax + gather (posttrain/kernels/hidden.py) against the float64 reference.

Notation: N rows, V vocabulary, H hidden size, B batch, T time. Both backends run here: the torch path
directly; the Triton path on CUDA copies when a GPU exists, else on the CPU through the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton), on tiny shapes because the
interpreter is slow.
"""

import functools
import os
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import posttrain.kernels.hidden as K
from posttrain.kernels import logprobs_from_hidden, native
from posttrain.kernels.hidden import logprobs_from_hidden_torch, reference_logprobs_from_hidden

CUDA = torch.cuda.is_available()
TRITON_OK = K.triton is not None and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(
    not TRITON_OK, reason="triton missing, or neither a GPU nor TRITON_INTERPRET=1"
)


def _backends():
    return ["torch", "torch-ops", pytest.param("triton", marks=needs_triton)]


# "torch": the torch path as it runs by default, its CPU float32 folds in C where a compiler built them
# (kernels/native.py); "torch-ops": the same path with the folds as torch ops.
@pytest.fixture(autouse=True)
def _torch_ops_folds(request, monkeypatch):
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("backend") == "torch-ops":
        monkeypatch.setattr(native, "enabled", False)


def _torch(backend):
    return backend in ("torch", "torch-ops")


# Small tiles on the torch path so every test crosses several row and vocabulary tiles.
def _torch_small(*args, **kw):
    return K.logprobs_from_hidden_torch(*args, rows_per_tile=2, vocab_per_tile=16, **kw)


def _triton_on_device(hidden, weight, index, *, bias=None, mask=None, **kw):
    """The Triton path on CUDA copies when a GPU exists (outputs back on the CPU, gradients flow to the CPU
    tensors; CPU autocast becomes CUDA autocast), else directly on the CPU through the interpreter."""
    kw = dict(rows_per_tile=2, vocab_per_tile=48) | kw  # every test crosses row and vocabulary tiles
    if not CUDA:
        return K.logprobs_from_hidden_triton(hidden, weight, index, bias=bias, mask=mask, **kw)
    # a caller's CPU autocast carried over to the GPU, where the matmuls now run
    autocast = torch.autocast(
        "cuda", torch.get_autocast_dtype("cpu"), enabled=torch.is_autocast_enabled("cpu")
    )
    with autocast:
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
    return _torch_small if _torch(backend) else _triton_on_device


def _public_on_device(backend):
    """`logprobs_from_hidden` at its default tiles with `backend`, the Triton one on CUDA copies when a GPU
    exists (outputs back on the CPU, gradients flowing to the CPU tensors)."""

    def call(hidden, weight, index, *, bias=None, **kw):
        if _torch(backend) or not CUDA:
            return logprobs_from_hidden(hidden, weight, index, bias=bias, backend="torch", **kw)
        bias = None if bias is None else bias.cuda()
        out = logprobs_from_hidden(
            hidden.cuda(), weight.cuda(), index.cuda(), bias=bias, backend=backend, **kw
        )
        return out.cpu() if isinstance(out, torch.Tensor) else tuple(o.cpu() for o in out)

    return call


class _RoundGrad(torch.autograd.Function):
    """Identity forward; backward rounds the gradient to `dtype` (as autograd does for a 16-bit lm_head's output)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).to(grad.dtype), None


def plain_reference(
    hidden,
    weight,
    index,
    *,
    bias=None,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    dtype=torch.float64,
    metrics=False,
):
    """float64 log-softmax of the logits built explicitly, written independently of the package's reference:
    hidden (N, H), weight (V, H), bias (V,) float64 -> logps (N,), entropy (N,), differentiable [, with metrics
    mean_logit (N,) = mean_v z_v and log_sum_sq (N,) = log sum_v p_v^2, z the tempered logits, p = softmax(z)].

    dtype bfloat16/float16 (the values of hidden, weight, bias must be that dtype's): the logits are what a 16-bit
    lm_head computes (F.linear in that dtype, rounded once) and their gradient is rounded to that dtype before it
    reaches hidden, weight and bias, as the kernel does; everything else stays float64."""
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (N, V) exact
    if dtype != torch.float64:
        low = torch.nn.functional.linear(
            *(None if x is None else x.detach().to(dtype) for x in (hidden, weight, bias))
        )
        logits = _RoundGrad.apply(logits + (low.double() - logits).detach(), dtype)
    x = logits * logit_scale
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    z = x / temperature
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    logps = z[torch.arange(len(index)), index] - lse
    p = torch.softmax(z, dim=-1)
    entropy = lse - (p * z).sum(-1)
    if not metrics:
        return logps, entropy
    return logps, entropy, z.sum(-1) / z.shape[-1], torch.log((p * p).sum(-1))


# Max abs error allowed on (logps, entropy) and the relative (to max |ref|) error on gradients, per dtype, against
# plain_reference (16-bit: the rounded logits and rounded dL/dlogits of a 16-bit lm_head, float64 otherwise).
# Measured maxima over the grid of test_values_and_grads_match_float64_reference: bfloat16 5.0e-7 (values),
# 3.1e-3 (gradients: the final rounding of a gradient to bf16 alone is up to 2^-9 = 2.0e-3 of the element);
# float16 4.5e-7, 3.4e-4. Tolerances are 2.5-4x those.
TOL = {  # (atol, rtol) on values, then gtol
    torch.float32: (2e-5, 1e-5, 2e-5),
    torch.bfloat16: (2e-6, 0.0, 8e-3),
    torch.float16: (2e-6, 0.0, 1e-3),
}
# Triton's interpreter casts float32 to bfloat16 by truncation (a GPU rounds to nearest, and so does torch): dL/da
# then carries up to 2^-8 relative error with a consistent sign, measured 8.8e-3 on the gradients.
INTERPRETED_BF16_GTOL = 2e-2


# On a GPU the tile matmuls run in cuBLAS, which need not round each 16-bit logit as the test's CPU F.linear does
# (another summation order, reduced-precision reductions): a logit one 16-bit ulp apart moves a log-prob by up to
# |z| 2^-8. There the 16-bit paths are checked against the exact float64 logits, with tolerances for that rounding.
TOL_EXACT_LOGITS = {torch.bfloat16: (8e-2, 1e-5, 3e-2), torch.float16: (1e-2, 1e-5, 4e-3)}


@functools.cache
def _cpu_mm_rounds_once(dtype) -> bool:
    """Whether torch's CPU matmul in `dtype` gives each product rounded once from its exact value, at shapes of
    the tiles these tests run, as the 16-bit reference (one F.linear over the whole vocabulary) assumes. Not so on
    an Intel Xeon with AVX512-FP16 and AMX: a float16 (3, 17) @ (17, 64) product there is an ulp off where
    (17, 123) is exact, so a tile's logits and the reference's can differ by an ulp (as cuBLAS's can on a GPU)."""
    g = torch.Generator().manual_seed(0)
    for rows, inner, cols in ((3, 17, 64), (3, 17, 123), (5, 64, 64), (7, 64, 256), (12, 17, 32)):
        a, b = (
            torch.randn(rows, inner, generator=g).to(dtype),
            torch.randn(cols, inner, generator=g).to(dtype),
        )
        if not torch.equal(torch.mm(a, b.T), (a.double() @ b.double().T).to(dtype)):
            return False
    return True


def _reference_mode(backend, dtype):
    """(plain_reference's dtype, (atol, rtol, gtol)) for a run of `backend` on inputs of `dtype`."""
    if dtype not in TOL_EXACT_LOGITS:
        return torch.float64, TOL[dtype]
    if (backend == "triton" and CUDA) or (backend == "torch" and not _cpu_mm_rounds_once(dtype)):
        return torch.float64, TOL_EXACT_LOGITS[dtype]
    atol, rtol, gtol = TOL[dtype]
    if backend == "triton" and dtype == torch.bfloat16:
        gtol = INTERPRETED_BF16_GTOL
    return dtype, (atol, rtol, gtol)


def _inputs(N, V, H, dtype, *, bias, seed=0, scale=1.0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (N,) if lead is None else lead
    hidden = (torch.randn(*shape, H, generator=g) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    index = torch.randint(0, V, shape, generator=g)
    index.view(-1)[0] = V - 1  # a target in the last (partial) vocabulary tile / Triton split
    return hidden, weight, b, index


def _errors(out, ref, params, ref_params, *, rtol=0.0, seed=1):
    """Errors of the outputs (max of |got - want| - rtol |want|) and max-relative errors of the gradients of a
    random combination of them."""
    errs = {}
    for name, got, want in zip(("logps", "entropy"), out, ref, strict=False):
        assert got.dtype == torch.float32
        assert torch.isfinite(got).all()
        errs[name] = float(((got.detach().double() - want.detach()).abs() - rtol * want.detach().abs()).max())
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g) for o in out]
    loss = sum((o * w).sum() for o, w in zip(out, weights, strict=True))
    ref_loss = sum((o * w.double()).sum() for o, w in zip(ref, weights, strict=True))
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    for name, got, want, p in zip(("dhidden", "dweight", "dbias"), grads, ref_grads, params, strict=False):
        assert got.dtype == p.dtype, name
        assert torch.isfinite(got).all(), name
        errs[name] = float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12))
    return errs


def _check_metrics(out, ref, dtype, *, tol=None):
    """(mean_logit, log_sum_sq) against float64 values: float32, no gradient, within TOL's atol and rtol."""
    atol, rtol, _ = tol or TOL[dtype]
    for name, got, want in zip(("mean_logit", "log_sum_sq"), out, ref, strict=True):
        assert got.dtype == torch.float32 and not got.requires_grad, name
        torch.testing.assert_close(got.double(), want.detach(), atol=atol, rtol=max(rtol, 1e-6), msg=name)


def _check(out, ref, params, ref_params, dtype, *, seed=1, gtol=None, tol=None):
    """Compare (logps, entropy) values, then gradients of a random combination of both; tol (atol, rtol, gtol)
    defaults to TOL[dtype], gtol overrides its last entry."""
    atol, rtol, default_gtol = tol or TOL[dtype]
    gtol = gtol or default_gtol
    errs = _errors(out, ref, params, ref_params, rtol=rtol, seed=seed)
    for name, err in errs.items():
        assert err < (gtol if name.startswith("d") else atol), f"{name}: error {err:.2e}"


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
GRID += [("torch-ops", torch.float32, H) for H in (17, 32)]
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
    metrics = dict(return_mean_logit=True, return_log_sum_sq=True)
    out = _fn(backend)(hidden, weight, index, bias=b, return_entropy=True, **metrics, **opts)
    ref_dtype, tol = _reference_mode(backend, dtype)
    ref = plain_reference(rh, rw, index, bias=rb, dtype=ref_dtype, metrics=True, **opts)
    _check_metrics(out[2:], ref[2:], dtype, tol=tol)
    _check(out[:2], ref[:2], params, ref_params, dtype, tol=tol)


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
@pytest.mark.parametrize(
    "opts", [dict(temperature=0.7), dict(softcap=2.0, logit_scale=1.5)], ids=["plain", "softcap"]
)
def test_metrics_carry_no_gradient_and_leave_everything_else_unchanged(backend, opts):
    """mean_logit and log_sum_sq come last, in that order, without gradient; asking for them changes no other output
    and no gradient, bit for bit."""
    hidden, weight, b, index = _inputs(5, 70, 16, torch.float32, bias=True, seed=14)
    mask = torch.tensor([True, True, False, True, True])
    every = dict(return_entropy=True, return_top1=True)

    def run(**metrics):
        params = [p.detach().clone().requires_grad_() for p in (hidden, weight, b)]
        out = _fn(backend)(*params[:2], index, bias=params[2], mask=mask, **every, **metrics, **opts)
        w = torch.randn(2, 5, generator=torch.Generator().manual_seed(2))
        (out[0] * w[0] + out[1] * w[1]).sum().backward()
        return out, [p.grad for p in params]

    plain, plain_grads = run()
    out, grads = run(return_mean_logit=True, return_log_sum_sq=True)
    assert len(out) == 5
    for x, y in zip((*plain, *plain_grads), (*out[:3], *grads), strict=True):
        assert torch.equal(x, y)
    _, mean_logit = _fn(backend)(hidden, weight, index, bias=b, mask=mask, return_mean_logit=True, **opts)
    _, log_sum_sq = _fn(backend)(hidden, weight, index, bias=b, mask=mask, return_log_sum_sq=True, **opts)
    assert torch.equal(out[3], mean_logit) and torch.equal(out[4], log_sum_sq)
    assert not torch.equal(mean_logit, log_sum_sq)  # the order check above can tell them apart
    assert not mean_logit.requires_grad and not log_sum_sq.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        (mean_logit.sum() + log_sum_sq.sum()).backward()


class _OpCounts(TorchDispatchMode):
    """Counts the aten ops run inside it, by name (bmm, sum, ...)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_torch_fold_does_the_metrics_work_only_when_asked(monkeypatch):
    # 2 row tiles x 3 vocabulary tiles = 6 folds. Per fold: the sum of e for s, the row-wise sum of e d for the
    # entropy's t; sum u for mean_logit, e squared in place and summed for log_sum_sq; nothing of theirs when not
    # asked (the torch ops' folds: the C ones are not torch ops)
    monkeypatch.setattr(native, "enabled", False)
    hidden, weight, _, index = _inputs(4, 40, 8, torch.float32, bias=False, seed=15)

    def ops(**flags):
        with torch.no_grad(), _OpCounts() as mode:
            logprobs_from_hidden_torch(hidden, weight, index, rows_per_tile=2, vocab_per_tile=16, **flags)
        return mode.counts

    for entropy in (False, True):
        plain = ops(return_entropy=entropy)
        assert plain["sum"] == (12 if entropy else 6) and plain["pow_"] == 0
        assert ops(return_entropy=entropy, return_mean_logit=True)["sum"] == plain["sum"] + 6
        both = ops(return_entropy=entropy, return_mean_logit=True, return_log_sum_sq=True)
        # square_ dispatches as pow_ (and alpha.square() as pow)
        assert both["sum"] == plain["sum"] + 12 and both["pow_"] == 6


@needs_triton
def test_triton_fold_compiles_the_metrics_in_only_when_asked(monkeypatch):
    # the flags are constexprs: a fold launched without the metrics is specialised with their code removed
    launches = []
    forward, backward = K._kernels()

    class Record:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((kwargs["WANT_MEAN_LOGIT"], kwargs["WANT_LOG_SUM_SQ"]))
                return forward[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(K, "_kernels", lambda: (Record(), backward))
    hidden, weight, _, index = _inputs(2, 40, 8, torch.float32, bias=False, seed=16)
    for flags in ((False, False), (True, False), (False, True)):
        launches.clear()
        _triton_on_device(hidden, weight, index, return_mean_logit=flags[0], return_log_sum_sq=flags[1])
        assert launches == [flags]  # one row tile, one vocabulary tile (48 wide)


@pytest.mark.parametrize("backend", _backends())
def test_masked_rows_are_zero_and_get_no_gradient(backend):
    hidden, weight, b, index = _inputs(6, 37, 16, torch.float32, bias=True, seed=5)
    index[1] = 10_000  # out of range, but masked: must be ignored
    mask = torch.tensor([True, False, True, True, False, True])
    every = dict(return_entropy=True, return_top1=True, return_mean_logit=True, return_log_sum_sq=True)
    logps, entropy, is_top1, mean_logit, log_sum_sq = _fn(backend)(
        hidden, weight, index, bias=b, mask=mask, **every
    )
    safe = index.clamp(max=36)
    ref = reference_logprobs_from_hidden(
        hidden.detach(), weight.detach(), safe, bias=b.detach(), mask=mask, **every
    )
    for i, got in ((0, logps), (1, entropy), (3, mean_logit), (4, log_sum_sq)):
        torch.testing.assert_close(got.double(), ref[i], atol=2e-5, rtol=0)
    assert logps[~mask].eq(0).all() and entropy[~mask].eq(0).all() and not is_top1[~mask].any()
    assert mean_logit[~mask].eq(0).all() and log_sum_sq[~mask].eq(0).all()
    (logps.sum() + entropy.sum()).backward()
    assert hidden.grad[~mask].eq(0).all()
    assert hidden.grad[mask].abs().sum() > 0

    # all rows masked: zeros, zero gradient, no error
    hidden.grad = None
    none = torch.zeros(6, dtype=torch.bool)
    logps, mean_logit, log_sum_sq = _fn(backend)(
        hidden, weight, index, bias=b, mask=none, return_mean_logit=True, return_log_sum_sq=True
    )
    assert logps.eq(0).all() and mean_logit.eq(0).all() and log_sum_sq.eq(0).all()
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
    fn = _torch_small if _torch(backend) else K.logprobs_from_hidden_triton
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
    every = dict(return_entropy=True, return_mean_logit=True, return_log_sum_sq=True, temperature=0.8)
    out = logprobs_from_hidden_torch(hidden, weight, index, bias=b, **every)
    ref = reference_logprobs_from_hidden(ref_params[0], ref_params[1], index, bias=rb, **every)
    _check_metrics(out[2:], ref[2:], torch.float32)
    # one tile spans up to 150k columns here: float32 sums that long carry ~1e-5 relative error
    _check(out[:2], ref[:2], params, ref_params, torch.float32, gtol=1e-4)


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
        logps, entropy, _, _ = logprobs_from_hidden_torch(
            hidden,
            weight,
            index,
            bias=b,
            return_entropy=True,
            return_mean_logit=True,
            return_log_sum_sq=True,
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
    got = _public_on_device(backend)(hidden, weight, index, bias=b, return_entropy=True)
    ref_dtype, tol = _reference_mode(backend, dtype)
    ref = plain_reference(*ref_params[:2], index, bias=ref_params[2], dtype=ref_dtype)
    _check(got, ref, params, ref_params, dtype, tol=tol)


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
    if backend == "triton" and CUDA and "index out of range" in match:
        pytest.skip("on a GPU the index check is a device assert: test_cuda_bad_index_is_a_device_assert")
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
    every = dict(return_entropy=True, return_mean_logit=True, return_log_sum_sq=True)
    out = _fn(backend)(hidden, weight, index, bias=b, **every, **opts)
    ref = reference_logprobs_from_hidden(*ref_params[:2], index, bias=ref_params[2], **every, **opts)
    # the mean over a vocabulary with -inf entries is -inf; with the softcap they count as -softcap
    assert (out[2] == float("-inf")).all() if "softcap" not in opts else torch.isfinite(out[2]).all()
    _check_metrics(out[2:], ref[2:], torch.float32)
    _check(out[:2], ref[:2], params, ref_params, torch.float32)


@pytest.mark.parametrize("backend", _backends())
def test_autocast_runs_the_matmuls_in_the_autocast_dtype(backend):
    """Under bf16 autocast the tiles are the bf16 logits an autocast `lm_head` computes; log-probs, entropy and
    the gradients (float32, the parameters' dtype) match the float64 reference taken on those logits."""
    from posttrain.kernels.logits import reference_logprobs_from_logits

    hidden, weight, _, index = _inputs(6, 200, 32, torch.float32, bias=False, seed=22)
    fn = _torch_small if _torch(backend) else _triton_on_device
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
    ref_dtype, tol = _reference_mode("triton", dtype)
    ref = plain_reference(*ref_params[:2], index, bias=ref_params[2], dtype=ref_dtype)
    _check(out, ref, params, ref_params, dtype, tol=tol)


# ----------------------------------------------------------------------------------------------------------
# The float64 references themselves, checked against each other.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [dict(), dict(temperature=0.7, logit_scale=1.3), dict(softcap=2.5, logit_scale=0.8, temperature=1.4)],
    ids=["plain", "scale", "softcap"],
)
def test_package_reference_equals_plain_log_softmax(opts):
    """reference_logprobs_from_hidden (the oracle of the kernel tests) against plain_reference, a float64
    torch.log_softmax of logits built explicitly in this file: values, entropy and the hidden, weight and bias
    gradients agree to float64 rounding, with bias, logit_scale, softcap and temperature."""
    g = torch.Generator().manual_seed(30)
    hidden = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 7, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 13, (5,), generator=g)
    every = dict(return_entropy=True, return_mean_logit=True, return_log_sum_sq=True)
    got = reference_logprobs_from_hidden(hidden, weight, index, bias=bias, **every, **opts)
    want = plain_reference(hidden, weight, index, bias=bias, metrics=True, **opts)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)
    got, want = got[:2], want[:2]
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got[0] * w[0] + got[1] * w[1]).sum(), (hidden, weight, bias))
    ref_grads = torch.autograd.grad((want[0] * w[0] + want[1] * w[1]).sum(), (hidden, weight, bias))
    for x, y in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# Issue 16 item 3: accuracy at large logits. Issue 17 item 4: top-1 ties. Row tiles, alignment, syncs.
# ----------------------------------------------------------------------------------------------------------


def _dyadic_inputs(N, V, H, shift, seed):
    """hidden, weight in multiples of 1/8 and a bias of shift + multiples of 1/64: every float32 partial sum of
    hidden @ weight.T + bias is exact (at most 20 significant bits), so the float32 logits equal the float64 ones
    and any error left is the kernel's own."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randint(-8, 9, (N, H), generator=g) / 8).requires_grad_()
    weight = (torch.randint(-8, 9, (V, H), generator=g) / 8).requires_grad_()
    bias = (shift + torch.randint(-64, 65, (V,), generator=g) / 64).requires_grad_()
    index = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, bias, index


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.7, logit_scale=1.3)], ids=["plain", "scaled"])
def test_logits_shifted_by_1e4_lose_no_accuracy(backend, opts):
    """All logits near 1e4 (float32 ulp 1e-3): logps, entropy and gradients stay as accurate as at 0, because
    they are kept relative to the row max (absolute lse and mu lost ~5e-4 here)."""
    hidden, weight, bias, index = _dyadic_inputs(6, 70, 8, 1e4, seed=31)
    with torch.no_grad():
        exact = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double())
        assert torch.equal(torch.nn.functional.linear(hidden, weight, bias).double(), exact)
    params = [hidden, weight, bias]
    ref_params = [p.detach().double().requires_grad_() for p in params]
    metrics = dict(return_mean_logit=True, return_log_sum_sq=True)
    out = _fn(backend)(hidden, weight, index, bias=bias, return_entropy=True, **metrics, **opts)
    ref = plain_reference(*ref_params[:2], index, bias=ref_params[2], metrics=True, **opts)
    # log_sum_sq is relative to the row max too; the mean logit is an absolute value (~1e4): a float32 rounding
    assert (out[3].double() - ref[3]).abs().max() < 2e-6
    torch.testing.assert_close(out[2].double(), ref[2], atol=0, rtol=2e-7)
    errs = _errors(out[:2], ref[:2], params, ref_params)
    assert errs["logps"] < 2e-6 and errs["entropy"] < 2e-6, errs
    assert max(errs["dhidden"], errs["dweight"], errs["dbias"]) < 2e-6, errs


def _tied_inputs(first_copy):
    """hidden (6, 8) with entries in [1/8, 1] and weight (100, 8) in multiples of 1/8 in [-1, 7/8], except the rows
    listed in first_copy and its tail, which are all ones: they hold every row's maximum logit, exactly tied (all
    sums exact). The copies sit in different vocabulary tiles and Triton blocks (tiles of 16 or 48, blocks of 32)."""
    g = torch.Generator().manual_seed(32)
    hidden = torch.randint(1, 9, (6, 8), generator=g) / 8
    weight = torch.randint(-8, 8, (100, 8), generator=g) / 8
    weight[first_copy] = 1.0
    return hidden, weight


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(
    ("copies", "index", "expected"),
    [
        # copies at 5 and 6 (same tile and block), 40 (another block; another tile at 16 wide), 70 and 90
        ([5, 6, 40, 70, 90], [5, 6, 40, 70, 90, 3], [True, False, False, False, False, False]),
        # the first copy in a later vocabulary tile: it wins, the copy in a still later tile does not
        ([70, 90], [70, 90, 70, 90, 0, 99], [True, False, True, False, False, False]),
    ],
    ids=["first-tile", "later-tile"],
)
def test_top1_follows_argmax_first_index_rule(backend, copies, index, expected):
    """is_top1 is `argmax == index` with torch.argmax's rule: a target tied with the maximum at a lower vocabulary
    index is not top-1, also when the lower one is in an earlier vocabulary tile or block."""
    hidden, weight = _tied_inputs(copies)
    index = torch.tensor(index)
    z = hidden @ weight.T  # exact
    assert (z[:, copies] == z.amax(1, keepdim=True)).all()  # the ties are real
    truth = z.argmax(-1) == index
    assert truth.tolist() == expected
    _, top1 = _fn(backend)(hidden, weight, index, return_top1=True)
    assert top1.tolist() == expected
    _, ref_top1 = reference_logprobs_from_hidden(hidden, weight, index, return_top1=True)
    assert ref_top1.tolist() == expected
    # bf16 logits (rounded to 8 bits, where ties are frequent): the argmax of the logits a bf16 lm_head computes
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    _, top1_bf16 = _fn(backend)(h16, w16, index, return_top1=True)
    assert top1_bf16.tolist() == (torch.nn.functional.linear(h16, w16).argmax(-1) == index).tolist()


@pytest.mark.parametrize("backend", _backends())
def test_top1_when_rows_take_the_lead_in_different_tiles(backend):
    """64 rows in one row tile over 20 vocabulary tiles: each row's running maximum moves on in tiles of its own,
    so a tile's new leaders are a different subset of the rows each time (the CPU fold takes the arg-max of
    those rows alone). Targets: the arg-max on even rows, the runner-up on odd ones."""
    g = torch.Generator().manual_seed(34)
    hidden, weight = torch.randn(64, 16, generator=g), torch.randn(320, 16, generator=g)
    z = hidden @ weight.T
    top2 = z.topk(2, dim=1).indices
    index = torch.where(torch.arange(64) % 2 == 0, top2[:, 0], top2[:, 1])
    fn = K.logprobs_from_hidden_torch if _torch(backend) else _triton_on_device
    _, top1 = fn(hidden, weight, index, return_top1=True, rows_per_tile=64, vocab_per_tile=16)
    assert top1.tolist() == [i % 2 == 0 for i in range(64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", _backends())
def test_several_row_tiles_at_default_sizes(backend, dtype, monkeypatch):
    """Default tiles shrunk through the module constants (4 rows, 256 columns): 21 rows make 6 row tiles, V = 600
    three vocabulary tiles (the last one ragged), so dhidden, dweight and dbias are float32 sums over row tiles
    (a 16-bit weight through the float32 (C, H) buffer)."""
    monkeypatch.setattr(K, "ROWS_PER_TILE", {"cpu": 4, "cuda": 4})
    monkeypatch.setattr(K, "TILE_ELEMENTS", {"cpu": 4 * 256, "cuda": 4 * 256})
    seen = []
    key = "torch" if _torch(backend) else backend
    fold_forward, fold_backward = K.FOLDS[key]

    def spy(a, *args, **kw):
        seen.append(tuple(a.shape))
        return fold_forward(a, *args, **kw)

    monkeypatch.setitem(K.FOLDS, key, (spy, fold_backward))
    hidden, weight, b, index = _inputs(21, 600, 16, dtype, bias=True, seed=33)
    params = [hidden, weight, b]
    ref_params = [p.detach().double().requires_grad_() for p in params]
    dev = "cuda" if backend == "triton" and CUDA else "cpu"
    fn = K.logprobs_from_hidden_torch if _torch(backend) else K.logprobs_from_hidden_triton
    every = dict(return_entropy=True, return_mean_logit=True, return_log_sum_sq=True)
    got = fn(*(p.to(dev) for p in (hidden, weight)), index.to(dev), bias=b.to(dev), **every)
    got = tuple(o.cpu() for o in got)
    # 21 rows: five tiles of 4 and one of 1
    assert sorted(set(seen)) == [(1, 88), (1, 256), (4, 88), (4, 256)] and len(seen) == 6 * 3
    ref_dtype, tol = _reference_mode(backend, dtype)
    ref = plain_reference(*ref_params[:2], index, bias=ref_params[2], dtype=ref_dtype, metrics=True)
    _check_metrics(got[2:], ref[2:], dtype, tol=tol)
    _check(got[:2], ref[:2], params, ref_params, dtype, tol=tol)


@pytest.mark.parametrize(
    ("backend", "N", "V", "vocab_per_tile"),
    [
        (
            "torch",
            3,
            50257,
            None,
        ),  # the buffer code is shared; the interpreter would take ~40 s on 50257 columns
        *(
            (backend, N, V, C)
            for backend in ("torch", "triton")
            for N, V, C in ((5, 1000, 300), (2, 37, None))
        ),
    ],
)
def test_tile_rows_start_128_bit_aligned(backend, N, V, vocab_per_tile, monkeypatch):
    """Every tile the folds see has a row stride that is a multiple of 256 elements (so each row starts 16-byte
    aligned and the Triton folds vectorise), for V not a multiple of 16, few rows and a ragged last tile."""
    if backend == "triton" and not TRITON_OK:
        pytest.skip("triton missing, or neither a GPU nor TRITON_INTERPRET=1")
    strides = []
    key = "torch" if _torch(backend) else backend
    fold_forward, fold_backward = K.FOLDS[key]

    def spy(fold):
        def run(a, *args, **kw):
            strides.append((a.stride(0), a.shape[1], a.data_ptr() % 16))
            return fold(a, *args, **kw)

        return run

    monkeypatch.setitem(K.FOLDS, key, (spy(fold_forward), spy(fold_backward)))
    hidden, weight, _, index = _inputs(N, V, 4, torch.float32, bias=False, seed=34)
    dev = "cuda" if backend == "triton" and CUDA else "cpu"
    fn = K.logprobs_from_hidden_torch if _torch(backend) else K.logprobs_from_hidden_triton
    logps = fn(hidden.to(dev), weight.to(dev), index.to(dev), vocab_per_tile=vocab_per_tile).cpu()
    logps.sum().backward()
    assert strides and all(stride % 256 == 0 and ptr == 0 for stride, _, ptr in strides), strides
    assert {width for _, width, _ in strides} == ({300, 100} if vocab_per_tile else {V})
    ref = reference_logprobs_from_hidden(hidden.detach(), weight.detach(), index)
    torch.testing.assert_close(logps.detach().double(), ref, atol=2e-5, rtol=1e-5)


def test_mixed_mm_form_selection():
    """acc (float32) += a @ b (16-bit): torch.mm(out_dtype=float32) on CUDA from torch 2.8, never the
    addmm(out_dtype, out=acc) form that 2.8 and 2.9 reject; versions compared as versions ("2.10" > "2.8")."""
    form = K._mixed_mm_form
    assert form("cuda", "2.8.0") == form("cuda", "2.9.1+cu128") == "mm_out_dtype"
    assert (
        form("cuda", "2.10.0") == form("cuda", "2.13.0+cu130") == "mm_out_dtype"
    )  # a string compare says no
    assert (
        form("cuda", "2.7.1+cu126") == form("cuda", "2.4.0") == form("cuda", "2.8.0a0+gitabcdef") == "upcast"
    )
    assert (
        form("cpu", "2.13.0+cpu") == form("cpu", "2.8.0") == "upcast"
    )  # the CPU has no aten::mm.dtype kernel
    assert set(K._MIXED_MM) == {"mm_out_dtype", "upcast"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("form", ["upcast", "mm_out_dtype"])
def test_mixed_mm_forms_match_float64(form, dtype):
    """Each form adds the exact product of the 16-bit operands to a float32 accumulator (one float32 rounding of
    the sum, no 16-bit rounding of the product)."""
    if form == "mm_out_dtype" and not CUDA:
        pytest.skip("torch.mm(out_dtype=float32) runs on CUDA only: CPU torch has no aten::mm.dtype kernel")
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(35)
    acc = torch.randn(64, 48, generator=g).to(dev)
    a = torch.randn(64, 200, generator=g).to(dtype).to(dev)
    b = torch.randn(200, 48, generator=g).to(dtype).to(dev)
    want = acc.double() + a.double() @ b.double()
    K._MIXED_MM[form](acc, a, b)
    assert acc.dtype == torch.float32
    err = ((acc.double() - want).abs() / want.abs().clamp_min(1.0)).max()
    assert err < 1e-5, err  # a product rounded to 16 bits first would be off by ~4e-3 (bf16) / 5e-4 (fp16)
    rounded = torch.randn(64, 48, generator=g).to(dev)
    rounded_want = rounded.double() + (a @ b).double()
    assert (
        (rounded_want - (rounded.double() + a.double() @ b.double())).abs().max()
    ) > 1e-3  # the check can fail


def test_fake_cuda_index_check_reads_nothing_on_the_host_and_mm_out_dtype_is_accepted():
    """On (fake) CUDA tensors, FakeTensorMode raises on any data-dependent host read (.item(), .tolist(), nonzero):
    the index range check passes it (torch._assert_async), the CPU-style check would not; and the gradient
    accumulation of 16-bit tiles takes the torch.mm(out_dtype=float32) form, which the fake accepts with the
    expected dtype. (A whole call cannot run on fake CUDA tensors in a CPU-only build: its allocations with a device
    index abort; the next test covers the whole call.)"""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    with FakeTensorMode():
        index = torch.randint(0, 1000, (300,), device="cuda")
        K._check_index_range(index, 1000, None)
        with pytest.raises(DataDependentOutputException):  # the fake does catch a host read
            bool((index < 0).any())
        acc = torch.zeros(300, 16, device="cuda")
        K._add_mm(
            acc,
            torch.randn(300, 1000, device="cuda").bfloat16(),
            torch.randn(1000, 16, device="cuda").bfloat16(),
        )
        assert acc.dtype == torch.float32 and acc.shape == (300, 16)
    assert K._mixed_mm_form("cuda", torch.__version__) == "mm_out_dtype"


def test_sync_free_path_reads_nothing_on_the_host_and_masks_cost_one(monkeypatch):
    """The whole call, forward and backward, with the CUDA choice forced on CPU tensors: under FakeTensorMode, which
    raises on any data-dependent host read (.item(), .tolist(), nonzero, bool()), without a mask; with a mask
    exactly one such op is recorded, the nonzero that sizes the matmuls."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    monkeypatch.setattr(K, "_sync_free", lambda device: True)
    with FakeTensorMode():
        hidden = torch.randn(30, 16, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(100, 16, dtype=torch.bfloat16, requires_grad=True)
        bias = torch.randn(100, dtype=torch.bfloat16, requires_grad=True)
        index = torch.randint(0, 100, (30,))
        logps, entropy, top1 = logprobs_from_hidden_torch(
            hidden, weight, index, bias=bias, return_entropy=True, return_top1=True, rows_per_tile=8,
            vocab_per_tile=32,
        )  # fmt: skip
        (logps.sum() + entropy.sum()).backward()
        assert weight.grad.shape == (100, 16) and top1.dtype == torch.bool
    monkeypatch.setattr(K, "_sync_free", lambda device: False)
    with FakeTensorMode(), pytest.raises(DataDependentOutputException):  # the CPU's check does read the host
        logprobs_from_hidden_torch(torch.randn(3, 16), torch.randn(10, 16), torch.randint(0, 10, (3,)))

    monkeypatch.setattr(K, "_sync_free", lambda device: True)
    syncs = ("aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.is_nonzero", "aten.equal")
    hidden, weight, b, index = _inputs(7, 40, 8, torch.float32, bias=True, seed=36)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    with _OpNames() as rec:
        logps = K.logprobs_from_hidden_torch(hidden, weight, index, bias=b, mask=mask, return_top1=True)[0]
        logps.sum().backward()
    assert [op.rsplit(".", 1)[0] for op in rec.names if op.startswith(syncs)] == ["aten.nonzero"]


class _OpNames(TorchDispatchMode):
    """Records the name of every aten op, whatever it returns (a host read returns a Python number)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_device_side_index_check_fails_without_naming_the_row(monkeypatch):
    """With the CUDA choice forced, an out-of-range index stops the call through torch._assert_async (on a GPU a
    device-side assert; on the CPU it raises at once), the message giving the range."""
    monkeypatch.setattr(K, "_sync_free", lambda device: True)
    hidden, weight, _, _ = _inputs(3, 10, 8, torch.float32, bias=False)
    with pytest.raises(RuntimeError, match=r"index out of range \[0, 10\) in logprobs_from_hidden"):
        K.logprobs_from_hidden_torch(hidden, weight, torch.tensor([0, 10, 2]))
    # masked rows are not checked
    logps = K.logprobs_from_hidden_torch(
        hidden, weight, torch.tensor([0, 10, 2]), mask=torch.tensor([True, False, True])
    )
    assert logps[1] == 0


@pytest.mark.parametrize("name", ["weight", "index", "bias", "mask"])
def test_inputs_on_another_device_are_named(name):
    args = dict(
        hidden=torch.zeros(3, 8),
        weight=torch.zeros(10, 8),
        index=torch.tensor([0, 1, 2]),
        bias=torch.zeros(10),
        mask=torch.ones(3, dtype=torch.bool),
    )
    args[name] = args[name].to("meta")
    hidden, weight, index = args.pop("hidden"), args.pop("weight"), args.pop("index")
    with pytest.raises(ValueError, match=f"^{name} is on meta but hidden is on cpu$"):
        logprobs_from_hidden_torch(hidden, weight, index, **args)


# ----------------------------------------------------------------------------------------------------------
# The backward from the forward's kept logits (`_kept_blocks`): the CPU path with one row tile, the logits in
# dweight's buffer (overlay: about n <= H) or in a buffer of their own of at most KEEP_BYTES
# ----------------------------------------------------------------------------------------------------------


def _run(N, V, H, *, bias, dtype=torch.float32, seed=5, retain=False, frozen_weight=False, **kw):
    """Outputs and the gradients of a random combination of them (hidden, weight[, bias])."""
    hidden, weight, b, index = _inputs(N, V, H, dtype, bias=bias, seed=seed)
    weight.requires_grad_(not frozen_weight)
    out = logprobs_from_hidden_torch(hidden, weight, index, bias=b, return_entropy=True, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out)
    params = [p for p in (hidden, weight, b) if p is not None and p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=retain)
    if retain:  # a second backward through the same graph
        grads = (grads, torch.autograd.grad(loss, params))
    return out, grads


def _spy_kept(monkeypatch):
    """The modes `_kept_blocks` chose ("overlay", "own" or None), one per forward on the tape."""
    modes = []
    real = K._kept_blocks

    def spy(*args):
        keep = real(*args)
        modes.append(None if keep is None else "overlay" if keep[1] else "own")
        return keep

    monkeypatch.setattr(K, "_kept_blocks", spy)
    return modes


@pytest.mark.parametrize(
    ("N", "V", "H", "options", "mode"),
    [
        (16, 512, 16, dict(vocab_per_tile=256), "overlay"),  # n = H: the blocks fill the buffer, dweight all
        (5, 1000, 16, dict(vocab_per_tile=256, temperature=0.7), "overlay"),  # a ragged last tile
        (7, 1000, 16, dict(logit_scale=0.5, softcap=3.0), "overlay"),  # one vocabulary tile
        (3, 700, 8, dict(vocab_per_tile=300), "overlay"),  # tiles of columns not a multiple of ROW_ALIGN
        # the blocks (rows aligned to 512 columns) fit in V H, but dweight's second tile would overwrite the end of
        # the first tile's block before the backward reads it: a buffer of their own
        (5, 556, 8, dict(vocab_per_tile=300), "own"),
        (
            17,
            300,
            16,
            dict(vocab_per_tile=128),
            "own",
        ),  # more rows than H: they do not fit in dweight's buffer
        (6, 300, 16, dict(vocab_per_tile=128, frozen_weight=True), "own"),  # no dweight to overlay
        # the forward writes its logits into the kept tile and folds them in the tile buffer, softcapped there
        (17, 300, 16, dict(vocab_per_tile=128, logit_scale=0.5, softcap=3.0), "own"),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_backward_from_kept_logits_is_bit_for_bit_the_recomputing_one(
    N, V, H, options, mode, bias, monkeypatch
):
    modes = _spy_kept(monkeypatch)
    out, grads = _run(N, V, H, bias=bias, **options)
    assert modes == [mode]
    monkeypatch.setattr(K, "KEEP_BYTES", 0)
    monkeypatch.setattr(K, "_kept_blocks", lambda *a: None)
    ref_out, ref_grads = _run(N, V, H, bias=bias, **options)
    for got, want in zip((*out, *grads), (*ref_out, *ref_grads), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("N", "H", "options", "dtype", "keep_bytes"),
    [
        (6, 16, dict(rows_per_tile=4), torch.float32, None),  # two row tiles
        (6, 16, {}, torch.bfloat16, None),  # 16-bit tiles: the accumulators are float32
        (17, 16, {}, torch.float32, 17 * 512 * 4 - 1),  # more rows than H, and their logits over KEEP_BYTES
        # two tiles of 260 and 40 columns, each a tile buffer 512 wide: 2 x 17 x 512 floats, not 17 x (512 + 256)
        (17, 16, dict(vocab_per_tile=260), torch.float32, 2 * 17 * 512 * 4 - 1),
    ],
)
def test_logits_are_recomputed_where_they_cannot_be_kept(N, H, options, dtype, keep_bytes, monkeypatch):
    used = []
    real = K._backward_from_kept
    monkeypatch.setattr(K, "_backward_from_kept", lambda *a: used.append(1) or real(*a))
    if keep_bytes is not None:
        monkeypatch.setattr(K, "KEEP_BYTES", keep_bytes)
    hidden, weight, _, index = _inputs(N, 300, H, dtype, bias=False)
    K.logprobs_from_hidden_torch(hidden, weight, index, **options).sum().backward()
    assert not used and hidden.grad is not None
    if (
        keep_bytes is not None
    ):  # one byte more and they are kept (each row padded to 512 columns, a multiple of ROW_ALIGN)
        monkeypatch.setattr(K, "KEEP_BYTES", keep_bytes + 1)
        K.logprobs_from_hidden_torch(hidden, weight, index, **options).sum().backward()
        assert used == [1]


def test_a_forward_without_gradients_keeps_nothing(monkeypatch):
    modes = _spy_kept(monkeypatch)
    hidden, weight, _, index = _inputs(6, 300, 16, torch.float32, bias=False)
    with torch.no_grad():
        K.logprobs_from_hidden_torch(hidden, weight, index)
    assert modes == []
    K.logprobs_from_hidden_torch(hidden, weight, index)
    assert modes == ["overlay"]  # the same call on the tape keeps its logits
    K.logprobs_from_hidden_torch(hidden.detach(), weight.detach(), index)
    assert modes == [
        "overlay",
        None,
    ]  # on the tape, but no input wants a gradient: no backward will read them


@pytest.mark.parametrize("N", [8, 20])  # overlaid, in a buffer of their own
def test_a_second_backward_through_the_graph_recomputes_the_overwritten_logits(N):
    (_, (first, second)) = _run(N, 600, 16, bias=True, retain=True, vocab_per_tile=256)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
