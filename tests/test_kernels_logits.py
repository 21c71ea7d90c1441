"""Log-softmax gathering from full logits: torch and Triton paths against a float64 reference.

Notation: N rows, V vocabulary, B batch, T time. Without a GPU the Triton kernels run under the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton); with one, on CUDA copies of the
CPU inputs, gradients flowing back to the CPU tensors.
"""

import math
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import posttrain.kernels as kernels
import posttrain.kernels.logits as L

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(
    L.triton is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="triton missing, or neither a GPU nor TRITON_INTERPRET=1",
)
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def _triton_on_device(logits, index, *, mask=None, **kwargs):
    """logprobs_from_logits_triton on CUDA copies when a GPU exists (outputs back on the CPU), else directly."""
    if not CUDA:
        return L.logprobs_from_logits_triton(logits, index, mask=mask, **kwargs)
    mask = None if mask is None else mask.cuda()
    out = L.logprobs_from_logits_triton(logits.cuda(), index.cuda(), mask=mask, **kwargs)
    return out.cpu() if isinstance(out, torch.Tensor) else tuple(t.cpu() for t in out)


IMPLS = {"torch": L.logprobs_from_logits_torch, "triton": _triton_on_device}


def _device(backend: str) -> str:
    """Where a test that calls the public function runs `backend`: Triton runs on the GPU when there is one."""
    return "cuda" if backend == "triton" and CUDA else "cpu"


# Tolerances against the float64 reference computed from the same (16-bit-rounded) inputs, so only the kernels'
# float32 arithmetic and the final rounding of the gradient to the input dtype separate them. Measured over the
# cases of this file (both backends, every dtype and temperature): values |got - ref| / (1 + |ref|) <= 2.9e-7 (V = 152k on the torch path: 8.7e-6, ATen's float32 row sums);
# gradients within 3.8e-7 * max|ref| of a value they are a rounding of (0 in 16-bit: every bf16 / fp16 gradient
# element was one of the two neighbours of the exact value).
VALUE_TOL = 1e-6  # atol and rtol of logps and entropy
GRAD_EPS = 1e-6  # times max|dlogits| of the case


def assert_rounding_of(got, ref, eps):
    """got (any float dtype) is a rounding, up or down, of some value within eps of ref (float64): the float32
    error of the computation is at most eps, and the one rounding to got's dtype is faithful. Rounding down or up
    both pass: the Triton interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest."""
    inf = torch.full_like(got, float("inf"))
    above, below = torch.nextafter(got, inf).double(), torch.nextafter(got, -inf).double()
    # got is a rounding of x exactly when below < x < above; the distance from ref to that interval must be <= eps
    excess = torch.maximum(below - ref, ref - above).clamp(min=0)
    worst = excess.max().item() if excess.numel() else 0.0
    assert worst <= eps, f"gradient off by {worst:.3e} beyond its rounding to {got.dtype} (allowed {eps:.3e})"


def run(fn, logits, index, *, weights=None, metrics=False, **kwargs):
    """Forward with entropy and top-1 [and mean_logit, log_sum_sq when metrics], then backward of
    sum(w1 * logps) + sum(w2 * entropy) over finite values.

    Returns (logps, entropy, top1, dlogits [, mean_logit, log_sum_sq]) with dlogits in the logits' dtype."""
    x = logits.detach().clone().requires_grad_()
    flags = dict(return_mean_logit=metrics, return_log_sum_sq=metrics)
    logps, entropy, top1, *extra = fn(x, index, return_entropy=True, return_top1=True, **flags, **kwargs)
    w1, w2 = weights if weights is not None else loss_weights(index.shape)
    # -inf log-probs (a target at -inf) have a finite gradient but would make the loss -inf: leave them out
    loss = (torch.where(torch.isfinite(logps), logps, 0) * w1).sum() + (entropy * w2).sum()
    loss.backward()
    return logps, entropy, top1, x.grad, *extra


def loss_weights(shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(
        shape, generator=gen, dtype=torch.float64
    )


def check_against_reference(
    backend, logits, index, *, temperature=1.0, mask=None, dtype=torch.float32, value_atol=None
):
    """Values (mean_logit and log_sum_sq included), top-1 and dlogits of one backend against the float64
    reference on the same (dtype) inputs. Returns (logps, entropy, top1, dlogits)."""
    logits = logits.to(dtype)
    weights = loss_weights(index.shape)
    options = dict(weights=weights, temperature=temperature, mask=mask, metrics=True)
    got = run(IMPLS[backend], logits, index, **options)
    ref = run(L.reference_logprobs_from_logits, logits.double(), index, **options)
    tol = value_atol or VALUE_TOL
    logps, entropy, top1, grad, mean_logit, log_sum_sq = got
    for name, x, want in (("mean_logit", mean_logit, ref[4]), ("log_sum_sq", log_sum_sq, ref[5])):
        assert x.dtype == torch.float32 and not x.requires_grad, name
        torch.testing.assert_close(x.double(), want, atol=tol, rtol=tol, msg=name)
    assert logps.dtype == torch.float32 and entropy.dtype == torch.float32 and top1.dtype == torch.bool
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(logps.double(), ref[0], atol=tol, rtol=tol)
    torch.testing.assert_close(entropy.double(), ref[1], atol=tol, rtol=tol)
    assert torch.equal(top1, ref[2])
    first_argmax = logits.argmax(-1) == index
    assert torch.equal(top1, first_argmax if mask is None else first_argmax & mask)
    assert_rounding_of(grad, ref[3], GRAD_EPS * ref[3].abs().max().item())
    return got[:4]


def random_case(N, V, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=gen) * scale
    index = torch.randint(0, V, (N,), generator=gen)
    return logits, index


# ----------------------------------------------------------------------------------------------------
# The reference itself, against a plain loop
# ----------------------------------------------------------------------------------------------------


def test_reference_matches_plain_loop():
    logits, index = random_case(4, 9)
    logits[1, 3] = float("-inf")
    index[2], index[3] = 5, 2
    logits[2, 5] = logits[2, 1] = logits[2].max() + 1  # the target ties an earlier column: not top-1
    logits[3, 2] = logits[3, 7] = logits[3].max() + 1  # the target ties a later column: top-1
    logps, entropy, top1, mean_logit, log_sum_sq = L.reference_logprobs_from_logits(
        logits,
        index,
        temperature=0.5,
        return_entropy=True,
        return_top1=True,
        return_mean_logit=True,
        return_log_sum_sq=True,
    )
    for n in range(4):
        z = [v / 0.5 for v in logits[n].tolist()]
        lse = math.log(sum(math.exp(v) for v in z))
        p = [math.exp(v - lse) for v in z]
        assert logps[n].item() == pytest.approx(z[index[n]] - lse, abs=1e-12)
        assert entropy[n].item() == pytest.approx(-sum(q * math.log(q) for q in p if q > 0), abs=1e-12)
        assert top1[n].item() == (index[n] == z.index(max(z)))  # list.index: the first column holding the max
        assert mean_logit[n].item() == pytest.approx(sum(z) / len(z), abs=1e-12)  # -inf in row 1
        assert log_sum_sq[n].item() == pytest.approx(math.log(sum(q * q for q in p)), abs=1e-12)
    assert top1[[2, 3]].tolist() == [False, True]


# ----------------------------------------------------------------------------------------------------
# Values and gradients, both backends
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_odd_shape_matches_reference(backend, dtype, temperature):
    logits, index = random_case(3, 123)
    check_against_reference(backend, logits, index, temperature=temperature, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_across_many_chunks_and_blocks(backend, dtype, monkeypatch):
    # 22 rows in chunks of 3 (eight chunks, the last partial) on the torch path; on the Triton path each row in
    # 32-wide blocks (four, the last ragged), so the online max / sum rescaling across blocks is exercised
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 3 * 123)
    monkeypatch.setattr(L, "_launch_config", lambda V, backward=False: (32, 4))
    logits, index = random_case(22, 123, seed=21)
    mask = torch.ones(22, dtype=torch.bool)
    mask[[4, 5, 17, 21]] = False
    for m in (None, mask):
        check_against_reference(backend, logits, index, temperature=0.7, mask=m, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_are_zero_and_get_no_gradient(backend):
    logits, index = random_case(6, 123, seed=3)
    mask = torch.tensor([True, False, True, False, False, True])
    index[1] = 10_000  # out of range but masked: never read
    logps, entropy, top1, grad = check_against_reference(
        backend, logits, index.clamp(max=122), temperature=0.7, mask=mask
    )
    logps2, entropy2, top12 = IMPLS[backend](
        logits, index, mask=mask, return_entropy=True, return_top1=True, temperature=0.7
    )
    assert torch.equal(logps2, logps) and torch.equal(entropy2, entropy) and torch.equal(top12, top1)
    assert torch.all(logps[~mask] == 0) and torch.all(entropy[~mask] == 0) and not top1[~mask].any()
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked(backend):
    logits, index = random_case(2, 50)
    mask = torch.zeros(2, dtype=torch.bool)
    logps, entropy, top1, grad, mean_logit, log_sum_sq = run(
        IMPLS[backend], logits, index, mask=mask, metrics=True
    )
    assert not logps.any() and not entropy.any() and not top1.any() and not grad.any()
    assert not mean_logit.any() and not log_sum_sq.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_32000(backend):
    logits, index = random_case(47, 32000, seed=5)
    mask = torch.ones(47, dtype=torch.bool)
    mask[::5] = False
    check_against_reference(backend, logits, index, temperature=1.3, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_151936_bf16(backend):
    # V = 151936 is not a multiple of the 4096-wide Triton block: the last block is partly masked
    logits, index = random_case(2, 151936, seed=6)
    index[0] = 151935  # the very last column
    # ATen's fp32 row sums over 152k terms carry ~sqrt(V) eps relative error (seen: 8.7e-6 on the torch path)
    check_against_reference(backend, logits, index, temperature=0.7, dtype=torch.bfloat16, value_atol=3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_extreme_and_infinite_logits(backend, temperature):
    logits, index = random_case(5, 300, seed=7)
    logits[0, :] = -1e4
    logits[0, 17] = 1e4  # one dominant entry: p = 1 there, 0 elsewhere (exp underflows)
    index[0] = 17
    logits[1, :150] = float("-inf")  # half the vocabulary impossible
    index[1] = 3  # the target is one of them: logps = -inf
    logits[2, ::2] = 1e4  # many tied maxima: the target among them, but column 0 holds the maximum first
    index[2] = 40
    logits[3, 5] = float("-inf")
    logits[3, 6] = 1e4
    index[3] = 6
    logits[4, :] = -1e4
    index[4] = 0  # all equal: uniform, column 0 is the first arg-max
    logps, entropy, top1, grad = check_against_reference(backend, logits, index, temperature=temperature)
    assert logps[1].item() == float("-inf")
    assert top1[[0, 3, 4]].tolist() == [True, True, True] and not top1[1] and not top1[2]
    assert torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    assert entropy[0].item() == pytest.approx(0.0, abs=1e-6)
    assert entropy[4].item() == pytest.approx(math.log(300), abs=1e-4)


# ----------------------------------------------------------------------------------------------------
# Top-1 is torch.argmax's: the first column holding the maximum
# ----------------------------------------------------------------------------------------------------


def tied_case(dtype, block):
    """(N, V) = (8, 4 * block) logits of `dtype` whose row maxima are tied between two or three columns, and
    targets on the tied columns: first, later, in the same block, in different blocks (block = the Triton
    kernel's block width), plus a row with no tie. Returns logits, index and the expected is_top1."""
    V = 4 * block
    gen = torch.Generator().manual_seed(20)
    logits = (torch.randn(8, V, generator=gen) * 2).to(dtype)
    top = logits.float().amax(-1) + 1  # a value above each row's maximum, exactly representable in dtype
    ties = [  # (columns holding the maximum, target, expected)
        ((3, 5), 5, False),  # tied with an earlier column in the same block
        ((3, 5), 3, True),  # the first of the tie
        ((1, 2 * block + 7), 2 * block + 7, False),  # tied with an earlier block
        ((1, 2 * block + 7), 1, True),  # tied with a later block
        ((0, block, V - 1), V - 1, False),  # three-way tie, target last (the ragged tail of the row)
        ((0, block, V - 1), 0, True),  # three-way tie, the first column
        ((block + 2, V - 1), block + 2, True),  # first of a tie that starts in a later block
        ((), 9, None),  # no tie: target column 9 set to the maximum, expected True
    ]
    index, expected = [], []
    for n, (cols, target, want) in enumerate(ties):
        for c in cols or (target,):
            logits[n, c] = top[n].to(dtype)
        index.append(target)
        expected.append(True if want is None else want)
    return logits, torch.tensor(index), torch.tensor(expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_top1_ties_go_to_the_first_column(backend, dtype, temperature, monkeypatch):
    # the Triton kernel walks the row in 32-wide blocks here, so ties straddle blocks as they do at V = 152k
    monkeypatch.setattr(L, "_launch_config", lambda V, backward=False: (32, 4))
    logits, index, expected = tied_case(dtype, 32)
    assert torch.equal(logits.argmax(-1) == index, expected)  # the case is what it says
    _, top1 = IMPLS[backend](logits, index, temperature=temperature, return_top1=True)
    assert torch.equal(top1, expected)
    _, ref_top1 = L.reference_logprobs_from_logits(logits, index, temperature=temperature, return_top1=True)
    assert torch.equal(ref_top1, expected)
    mask = torch.tensor([True, True, False, True, True, False, True, True])
    _, masked = IMPLS[backend](logits, index, temperature=temperature, mask=mask, return_top1=True)
    assert torch.equal(masked, expected & mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_is_taken_before_the_temperature(backend):
    # two neighbouring float32 logits that x * (1 / 0.7) rounds to one value: the larger one, at the later
    # column, is the arg-max of the logits; on the tempered values it would lose the tie to the earlier column
    a = torch.tensor(0.9000000953674316)
    logits = torch.zeros(2, 12)
    logits[:, 3], logits[:, 7] = a, torch.nextafter(a, torch.tensor(1.0))
    assert torch.mul(logits[0, 3], 1 / 0.7) == torch.mul(logits[0, 7], 1 / 0.7)  # merged by the temperature
    index = torch.tensor([7, 3])
    _, top1 = IMPLS[backend](logits, index, temperature=0.7, return_top1=True)
    assert top1.tolist() == [True, False] == (logits.argmax(-1) == index).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_and_logps_only_gradients(backend):
    # grad through one output at a time exercises the None-gradient branches of both backward passes
    logits, index = random_case(4, 77, seed=8)
    ref_x = logits.double().requires_grad_()
    ref_logps, ref_entropy = L.reference_logprobs_from_logits(
        ref_x, index, temperature=1.3, return_entropy=True
    )
    (ref_g_logps,) = torch.autograd.grad(ref_logps.sum(), ref_x, retain_graph=True)
    (ref_g_entropy,) = torch.autograd.grad(ref_entropy.sum(), ref_x)
    x = logits.clone().requires_grad_()
    logps, entropy = IMPLS[backend](x, index, temperature=1.3, return_entropy=True)
    (g_logps,) = torch.autograd.grad(logps.sum(), x, retain_graph=True)
    (g_entropy,) = torch.autograd.grad(entropy.sum(), x)
    torch.testing.assert_close(g_logps.double(), ref_g_logps, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(g_entropy.double(), ref_g_entropy, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_conventions(backend):
    logits, index = random_case(3, 20)
    fn = IMPLS[backend]
    assert isinstance(fn(logits, index), torch.Tensor)
    logps, entropy = fn(logits, index, return_entropy=True)
    logps2, top1 = fn(logits, index, return_top1=True)
    assert entropy.dtype == torch.float32 and top1.dtype == torch.bool and not top1.requires_grad
    assert torch.equal(logps, logps2)
    _, mean_logit = fn(logits, index, return_mean_logit=True)
    _, log_sum_sq = fn(logits, index, return_log_sum_sq=True)
    _, top1_2, log_sum_sq2 = fn(logits, index, return_top1=True, return_log_sum_sq=True)
    assert torch.equal(top1_2, top1) and torch.equal(log_sum_sq2, log_sum_sq)
    # every output asked for: the documented order, logps, entropy, is_top1, mean_logit, log_sum_sq
    every = fn(
        logits, index, return_entropy=True, return_top1=True, return_mean_logit=True, return_log_sum_sq=True
    )
    for got, want in zip(every, (logps, entropy, top1, mean_logit, log_sum_sq), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(mean_logit, log_sum_sq)  # the comparisons above can tell the two apart


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_metrics_carry_no_gradient_and_leave_the_backward_unchanged(backend, masked):
    """mean_logit and log_sum_sq are non-differentiable: asking for them changes no gradient, bit for bit."""
    logits, index = random_case(5, 130, seed=17)
    mask = torch.tensor([True, False, True, True, True]) if masked else None
    plain = run(IMPLS[backend], logits, index, mask=mask, temperature=0.7)
    with_metrics = run(IMPLS[backend], logits, index, mask=mask, temperature=0.7, metrics=True)
    for a, b in zip(plain, with_metrics[:4], strict=True):
        assert torch.equal(a, b)
    assert not with_metrics[4].requires_grad and not with_metrics[5].requires_grad
    x = logits.clone().requires_grad_()
    _, mean_logit, log_sum_sq = IMPLS[backend](x, index, return_mean_logit=True, return_log_sum_sq=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        (mean_logit.sum() + log_sum_sq.sum()).backward()


class _OpCounts(TorchDispatchMode):
    """Counts the aten ops run inside it, by name (mean, _softmax, ...)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_torch_path_does_the_metrics_work_only_when_asked(monkeypatch):
    # three chunks of three rows: the metrics' ops (z.mean for mean_logit; softmax, then p * p summed and logged for
    # log_sum_sq) run once per chunk when asked and never otherwise; with the entropy they share its softmax
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 3 * 40)
    logits, index = random_case(9, 40, seed=18)

    def ops(**flags):
        with _OpCounts() as mode:
            L.logprobs_from_logits_torch(logits, index, temperature=0.7, **flags)
        return mode.counts

    plain, entropy = ops(), ops(return_entropy=True)
    assert plain["mean"] == plain["_softmax"] == plain["log_"] == 0
    assert entropy["mean"] == entropy["log_"] == 0 and entropy["_softmax"] == 3
    assert ops(return_mean_logit=True)["mean"] == 3
    assert ops(return_log_sum_sq=True)["_softmax"] == ops(return_log_sum_sq=True)["log_"] == 3
    assert ops(return_entropy=True, return_log_sum_sq=True)["_softmax"] == 3


@needs_triton
def test_triton_kernel_compiles_the_metrics_in_only_when_asked(monkeypatch):
    # the flags are constexprs: a launch without the metrics is specialised with their code removed
    launches = []
    forward, backward = L._kernels()

    class Record:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append({k: kwargs[k] for k in ("HAS_MEAN_LOGIT", "HAS_LOG_SUM_SQ")})
                return forward[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(L, "_kernels", lambda: (Record(), backward))
    logits, index = random_case(2, 30)
    for mean_logit, log_sum_sq in ((False, False), (True, False), (False, True)):
        _triton_on_device(logits, index, return_mean_logit=mean_logit, return_log_sum_sq=log_sum_sq)
    assert launches == [
        {"HAS_MEAN_LOGIT": False, "HAS_LOG_SUM_SQ": False},
        {"HAS_MEAN_LOGIT": True, "HAS_LOG_SUM_SQ": False},
        {"HAS_MEAN_LOGIT": False, "HAS_LOG_SUM_SQ": True},
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_batch_shape(backend):
    logits, index = random_case(2 * 3, 50, seed=9)
    logits3, index3 = logits.view(2, 3, 50), index.view(2, 3)
    mask3 = torch.tensor([[True, True, False], [True, False, True]])
    logps, entropy, top1, grad = run(IMPLS[backend], logits3, index3, mask=mask3, temperature=0.7)
    assert logps.shape == entropy.shape == top1.shape == (2, 3) and grad.shape == (2, 3, 50)
    flat = run(IMPLS[backend], logits, index, mask=mask3.reshape(-1), temperature=0.7, weights=None)
    w = loss_weights((2, 3))
    ref = run(
        L.reference_logprobs_from_logits, logits3.double(), index3, mask=mask3, temperature=0.7, weights=w
    )
    torch.testing.assert_close(logps.double(), ref[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref[3], atol=2e-6, rtol=1e-5)
    assert torch.equal(flat[0].view(2, 3), logps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed_batch", "row_stride", "vocab_stride"])
def test_non_contiguous_input(backend, layout):
    gen = torch.Generator().manual_seed(10)
    if layout == "transposed_batch":  # (B, T, V) view of a (T, B, V) tensor: reshape must copy
        logits = torch.randn(5, 2, 61, generator=gen).transpose(0, 1)
    elif layout == "row_stride":  # rows padded to 70 columns: row stride 70, unit column stride
        logits = torch.randn(2, 5, 70, generator=gen)[..., :61]
    else:  # vocabulary axis strided: (V, N).T
        logits = torch.randn(61, 10, generator=gen).T.reshape(2, 5, 61)
    assert not logits.is_contiguous()
    index = torch.randint(0, 61, (2, 5), generator=gen)
    w = loss_weights((2, 5))
    got = run(IMPLS[backend], logits, index, temperature=1.3, weights=w)
    ref = run(L.reference_logprobs_from_logits, logits.double(), index, temperature=1.3, weights=w)
    torch.testing.assert_close(got[0].double(), ref[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].double(), ref[1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[3].double(), ref[3], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    logps, entropy = IMPLS[backend](torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert logps.shape == entropy.shape == (0,)


def test_torch_path_gradcheck_float64():
    logits, index = random_case(3, 7, seed=11)
    logits = logits.double().requires_grad_()
    mask = torch.tensor([True, False, True])

    def f(x):
        return L.logprobs_from_logits_torch(x, index, temperature=0.7, mask=mask, return_entropy=True)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


def test_torch_path_chunks_match_one_chunk(monkeypatch):
    # many chunks (one row each) and the default single chunk give the same numbers
    logits, index = random_case(9, 40, seed=12)
    mask = torch.tensor([True, True, False, True, True, True, False, True, True])
    whole = run(L.logprobs_from_logits_torch, logits, index, mask=mask, temperature=0.7)
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 40)
    assert L._chunk_rows(40) == 1
    chunked = run(L.logprobs_from_logits_torch, logits, index, mask=mask, temperature=0.7)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# Buffers: every element written (poisoned allocations), in-place backward
# ----------------------------------------------------------------------------------------------------


def poisoned_empty(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(
            shape if isinstance(shape, tuple) else (shape,), float("nan"), dtype=dtype, device=device
        )
    fill = True if dtype == torch.bool else 7  # 7 is neither False (0) nor True (1) as int8
    return torch.full(shape if isinstance(shape, tuple) else (shape,), fill, dtype=dtype, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_every_output_and_gradient_element_is_written(backend, masked, monkeypatch):
    monkeypatch.setattr(L, "_empty", poisoned_empty)
    logits, index = random_case(5, 130, seed=13)
    mask = torch.tensor([True, False, True, True, False]) if masked else None
    logps, entropy, top1, grad = check_against_reference(backend, logits, index, mask=mask, temperature=0.7)
    assert not logps.isnan().any() and not entropy.isnan().any() and not grad.isnan().any()
    assert set(top1.view(torch.int8).tolist()) <= {0, 1}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_gradient_into_logits(backend, masked, dtype):
    logits, index = random_case(4, 90, seed=14)
    logits = logits.to(dtype)
    mask = torch.tensor([True, False, True, True]) if masked else None
    expected = run(IMPLS[backend], logits, index, mask=mask, temperature=1.3)[3]
    base = logits.clone().requires_grad_()
    buffer = base * 1  # a non-leaf activation, as the logits are in a model
    logps, entropy = IMPLS[backend](
        buffer, index, mask=mask, temperature=1.3, return_entropy=True, inplace_backward=True
    )
    w1, w2 = loss_weights(index.shape)
    ((logps * w1).sum() + (entropy * w2).sum()).backward()
    torch.testing.assert_close(base.grad, expected, atol=0, rtol=0)
    if backend == "torch" or not CUDA:  # (on a GPU the kernel wrote into the CUDA copy)
        torch.testing.assert_close(
            buffer.detach(), expected, atol=0, rtol=0
        )  # the logits buffer now holds it


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_when_another_node_saved_the_logits_raises(backend):
    # The gradient overwrites the logits: a node that saved them for its own backward would read the gradient.
    # Autograd must see the write (the version counter) and refuse, on both backends, rather than return wrong
    # gradients (issue 16: off by up to 5.8 on the Triton path before).
    logits, index = (t.to(_device(backend)) for t in random_case(4, 50, seed=16))
    w = logits.clone().requires_grad_()
    x = w * 1  # a non-leaf activation
    other = (x * x).sum()  # mul saves x for its backward
    logps = kernels.logprobs_from_logits(x, index, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logps.sum() + other).backward()


# ----------------------------------------------------------------------------------------------------
# Memory: the torch path never builds a float32 (N, V) tensor
# ----------------------------------------------------------------------------------------------------


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak resident set) to the current resident set
        return True
    except OSError:
        return False


def _peak_and_current_rss() -> tuple[int, int]:
    status = open("/proc/self/status").read()
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    return hwm, rss


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_torch_path_peak_memory_stays_below_a_float32_copy():
    # bf16 logits (N, V): a float32 (N, V) copy would be 2x the input, 262 MB here; ours may add the bf16
    # gradient (1x the input, backward only) plus float32 work buffers of CHUNK_ELEMENTS each
    N, V = 2048, 32000
    gen = torch.Generator().manual_seed(15)
    logits = torch.randn(N, V, generator=gen).to(torch.bfloat16).requires_grad_()
    index = torch.randint(0, V, (N,), generator=gen)
    f32_copy = N * V * 4
    work = 4 * L.CHUNK_ELEMENTS * 4 + 8 * 2**20  # four buffers + slack for small tensors
    assert L._chunk_rows(V) * V <= L.CHUNK_ELEMENTS
    assert work < f32_copy / 3

    if not _peak_rss_reset():
        pytest.skip("/proc/self/clear_refs is not writable")
    _, before = _peak_and_current_rss()
    logps, entropy = L.logprobs_from_logits_torch(logits, index, temperature=0.7, return_entropy=True)
    forward_peak = _peak_and_current_rss()[0] - before
    assert forward_peak < work, f"forward peak {forward_peak / 2**20:.0f} MiB"

    _peak_rss_reset()
    _, before = _peak_and_current_rss()
    (logps.sum() + entropy.sum()).backward()
    backward_peak = _peak_and_current_rss()[0] - before
    grad_bytes = N * V * 2
    assert backward_peak < grad_bytes + work, f"backward peak {backward_peak / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------------------------------
# Dispatch and bad input
# ----------------------------------------------------------------------------------------------------


def _spy(monkeypatch, name):
    calls = []
    real = getattr(L, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(L, name, spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_env_var_picks_the_backend(backend, monkeypatch):
    torch_calls = _spy(monkeypatch, "logprobs_from_logits_torch")
    triton_calls = _spy(monkeypatch, "logprobs_from_logits_triton")
    monkeypatch.setenv("POSTTRAIN_KERNEL_BACKEND", backend)
    logits, index = random_case(2, 30)
    logps = kernels.logprobs_from_logits(logits.to(_device(backend)), index.to(_device(backend)))
    torch.testing.assert_close(
        logps.cpu().double(), L.reference_logprobs_from_logits(logits, index), atol=2e-6, rtol=0
    )
    assert (
        (torch_calls, triton_calls) == (["logprobs_from_logits_torch"], [])
        if backend == "torch"
        else (
            [],
            ["logprobs_from_logits_triton"],
        )
    )


def test_cpu_default_is_torch_and_argument_beats_env(monkeypatch):
    torch_calls = _spy(monkeypatch, "logprobs_from_logits_torch")
    monkeypatch.delenv("POSTTRAIN_KERNEL_BACKEND", raising=False)
    logits, index = random_case(2, 30)
    kernels.logprobs_from_logits(logits, index)
    monkeypatch.setenv("POSTTRAIN_KERNEL_BACKEND", "triton")
    kernels.logprobs_from_logits(logits, index, backend="torch")
    assert len(torch_calls) == 2


def test_bad_backend_is_rejected_by_name(monkeypatch):
    logits, index = random_case(2, 30)
    monkeypatch.setenv("POSTTRAIN_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"POSTTRAIN_KERNEL_BACKEND='cuda' is not a kernel backend"):
        kernels.logprobs_from_logits(logits, index)
    monkeypatch.delenv("POSTTRAIN_KERNEL_BACKEND")
    with pytest.raises(ValueError, match=r"backend='fast' is not a kernel backend"):
        kernels.logprobs_from_logits(logits, index, backend="fast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_problem(backend):
    fn = IMPLS[backend]
    logits, index = random_case(3, 10)
    with pytest.raises(
        ValueError, match=r"index has shape \(2,\); expected the leading shape of logits \(3,\)"
    ):
        fn(logits, index[:2])
    with pytest.raises(TypeError, match="index dtype torch.float32 is not an integer dtype"):
        fn(logits, index.float())
    bad = index.clone()
    bad[2] = 10
    # on a GPU the check is a device assert: test_cuda_bad_index_is_a_device_assert
    if _device(backend) == "cpu":
        with pytest.raises(IndexError, match=r"index\[2\] \(flattened row 2\) = 10 is outside \[0, V=10\)"):
            fn(logits, bad)
        bad[2] = -1
        with pytest.raises(IndexError, match=r"index\[2\] \(flattened row 2\) = -1"):
            fn(logits, bad)
    with pytest.raises(ValueError, match=r"mask has shape \(2,\)"):
        fn(logits, index, mask=torch.ones(2, dtype=torch.bool))
    for t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            fn(logits, index, temperature=t)
    with pytest.raises(TypeError, match="logits dtype torch.int64 is not supported"):
        fn(logits.long(), index)
    with pytest.raises(ValueError, match=r"empty vocabulary dimension"):
        fn(torch.zeros(3, 0), index)


BAD_INDEX_ON_CUDA = """
import sys, torch
from posttrain.kernels import logprobs_from_hidden, logprobs_from_logits
path, bad = sys.argv[1], int(sys.argv[2])
index = torch.tensor([0, 1, 10 if bad else 2], device="cuda")
if path == "logits":
    out = logprobs_from_logits(torch.randn(3, 10, device="cuda"), index, backend="triton")
else:
    out = logprobs_from_hidden(torch.randn(3, 8, device="cuda"), torch.randn(10, 8, device="cuda"), index,
                               backend="triton")
torch.cuda.synchronize()
print("finite" if bool(torch.isfinite(out).all()) else "not finite")
"""


@pytest.mark.skipif(not CUDA or L.triton is None, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_cuda_bad_index_is_a_device_assert(path):
    # On a GPU the index check never synchronises with the host (the row it would name costs a sync): an index
    # outside [0, V) fires a device-side assert, which ends the process's CUDA context, so each call runs in a
    # process of its own; the same call with a good index runs to the end.
    def run(bad: int):
        argv = [sys.executable, "-c", BAD_INDEX_ON_CUDA, path, str(bad)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    good, bad = run(0), run(1)
    assert good.returncode == 0 and good.stdout.strip() == "finite", good.stderr[-2000:]
    assert bad.returncode != 0 and "device-side assert" in bad.stdout + bad.stderr, bad.stderr[-2000:]


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails on any op that reads a tensor's values into Python (on a GPU each is a device synchronisation)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("__bool__", "item", "tolist", "nonzero", "__int__", "__index__", "__float__"):
            raise AssertionError(f"host read of a tensor's value: {name}")
        return func(*args, **(kwargs or {}))


def test_index_range_check_off_the_host_is_a_device_assert(monkeypatch):
    # On a GPU the check must not synchronise: it becomes torch._assert_async, which on the CPU raises at once,
    # so the device branch can run here with _on_host faked
    monkeypatch.setattr(L, "_on_host", lambda tensor: False)
    logits, index = random_case(3, 10)
    mask = torch.tensor([True, False, True])
    bad = index.clone()
    bad[1] = 10  # masked: never read, so accepted
    with _NoHostReads():
        L._check_inputs(logits, bad, mask, 1.0)
        L._check_inputs(logits, index, None, 1.0)
    bad[2] = -1
    with pytest.raises(RuntimeError, match=r"an index is outside \[0, V=10\) in a kept row"):
        L._check_inputs(logits, bad, mask, 1.0)
    with _NoHostReads(), pytest.raises(AssertionError, match="host read"):  # the probe itself can fail
        monkeypatch.setattr(L, "_on_host", lambda tensor: True)
        L._check_inputs(logits, index, None, 1.0)


@needs_triton
def test_triton_path_reads_no_value_on_the_host(monkeypatch):
    # What a CUDA step needs to run without a host sync (and be graph-captured): forward with a mask, entropy and
    # top-1, and backward, never read a tensor's value into Python. On the CPU the index check is faked off-host.
    monkeypatch.setattr(L, "_on_host", lambda tensor: False)
    device = "cuda" if CUDA else "cpu"
    logits = torch.randn(4, 50, device=device, requires_grad=True)
    index = torch.randint(0, 50, (4,), device=device)
    mask = torch.tensor([True, False, True, True], device=device)
    with _NoHostReads():
        logps, entropy, _ = L.logprobs_from_logits_triton(
            logits, index, mask=mask, return_entropy=True, return_top1=True
        )
        (logps.sum() + entropy.sum()).backward()
    assert logits.grad is not None and logits.grad[1].eq(0).all()


@needs_triton
def test_triton_rejects_float64_with_a_pointer_to_torch():
    logits, index = random_case(2, 10)
    with pytest.raises(
        TypeError, match="float64 is not supported by the triton backend; use backend='torch'"
    ):
        L.logprobs_from_logits_triton(logits.double(), index)
