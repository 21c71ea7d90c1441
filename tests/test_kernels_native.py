"""The output layer's CPU folds in C (posttrain/kernels/native.py, native.c) against the torch ops' folds.

tests/test_kernels_hidden.py runs its whole grid on both ("torch" and "torch-ops"); here the C folds are
checked at the sizes they are built for (1024-column tiles, many rows, every output and gradient at once),
on inputs that reach their edge cases, and for being built at all where a compiler exists."""

import os
import shutil

import pytest
import torch

import posttrain.kernels.hidden as K
from posttrain.kernels import native

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler built the native folds")


def test_native_folds_are_built_where_a_compiler_exists():
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")
    if os.environ.get("POSTTRAIN_NATIVE") == "0":
        pytest.skip("switched off by POSTTRAIN_NATIVE=0")
    assert native.enabled and native.library() is not None


def test_a_failing_build_leaves_the_torch_ops(monkeypatch, tmp_path):
    """No usable compiler (or a read-only cache): library() is None, never an exception, and the forward runs."""
    hidden, weight, bias, index = _inputs(N=4, V=300, H=8, seed=4)
    expected = K.logprobs_from_hidden_torch(hidden, weight, index, bias=bias)
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    for cc in ("/nonexistent/cc", "false"):
        monkeypatch.setenv("CC", cc)
        native.library.cache_clear()
        try:
            assert native.library() is None and not native.available()
            torch.testing.assert_close(
                K.logprobs_from_hidden_torch(hidden, weight, index, bias=bias), expected
            )
        finally:
            native.library.cache_clear()
    assert not list((tmp_path / "cache").glob("*.so"))


def _run(hidden, weight, index, bias, use_native, monkeypatch, **kw):
    """Every output and the gradients of hidden, weight, bias through a random combination of logps and entropy,
    with the folds in C or as torch ops; also how many folds (forward and backward) ran in C."""
    calls = []

    def counted(fold):
        def run(*args):
            done = fold(*args)
            calls.append(done)
            return done

        return run

    monkeypatch.setattr(native, "enabled", use_native)
    monkeypatch.setattr(native, "fold_forward", counted(native.fold_forward))
    monkeypatch.setattr(native, "fold_backward", counted(native.fold_backward))
    params = [p.detach().clone().requires_grad_() for p in (hidden, weight, bias)]
    outs = K.logprobs_from_hidden_torch(
        params[0], params[1], index, bias=params[2], return_entropy=True, return_top1=True,
        return_mean_logit=True, return_log_sum_sq=True, vocab_per_tile=1024, **kw,
    )  # fmt: skip
    g = torch.Generator().manual_seed(3)
    finite = outs[0].isfinite() & outs[1].isfinite()
    w_logp, w_ent = (torch.randn(len(index), generator=g) * finite for _ in range(2))
    (outs[0].nan_to_num() * w_logp + outs[1].nan_to_num() * w_ent).sum().backward()
    return [o.detach() for o in outs], [p.grad for p in params], sum(calls)


def _inputs(N=96, V=5000, H=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    bias = torch.randn(V, generator=g)
    index = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, bias, index


@needs_native
@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.7, logit_scale=1.3)], ids=["plain", "scaled"])
def test_native_folds_equal_the_torch_ops_folds(opts, monkeypatch):
    hidden, weight, bias, index = _inputs()
    with torch.no_grad():
        # masked columns, in the first, a middle and the ragged last tile
        bias[[7, 1500, 4999]] = float("-inf")
        hidden[5] *= 40.0  # a peaked row: most exponentials underflow
        hidden[6] = 0.0  # every logit the bias: leads taken on several tiles
        index[2] = 7  # a target in a masked column: logp -inf
        # targets at tile edges (1024 columns a tile, rows 1024 floats apart), on the rows where the two
        # threads' halves meet (a write past row 47's tile row lands in row 48's) and on the last row
        index[[0, 47, 48, 95]] = torch.tensor([1023, 1024, 2047, 4999])
        z = hidden @ weight.T + bias
        index[8:40] = z[8:40].argmax(1)  # top-1 right on these rows
    ops, ops_grads, ops_calls = _run(hidden, weight, index, bias, False, monkeypatch, **opts)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the C folds split the rows between two threads, whatever the test session runs
    try:
        c, c_grads, c_calls = _run(hidden, weight, index, bias, True, monkeypatch, **opts)
    finally:
        torch.set_num_threads(threads)
    # 96 rows: one row tile; 5000 columns: five vocabulary tiles, forward and backward
    assert ops_calls == 0 and c_calls == 10
    assert c[0][2] == ops[0][2] == float("-inf")
    assert c[2].tolist() == ops[2].tolist() and c[2][8:40].all()
    for name, x, y in zip(("logps", "entropy", "mean_logit", "log_sum_sq"), (c[0], c[1], c[3], c[4]),
                          (ops[0], ops[1], ops[3], ops[4]), strict=True):  # fmt: skip
        torch.testing.assert_close(x, y, rtol=1e-5, atol=2e-5, msg=name)
    for name, x, y in zip(("hidden", "weight", "bias"), c_grads, ops_grads, strict=True):
        assert (x - y).abs().max() <= 1e-5 * y.abs().max(), name


@needs_native
def test_native_folds_carry_nan_as_the_torch_ops_do(monkeypatch):
    hidden, weight, bias, index = _inputs(N=8, V=3000, seed=1)
    with torch.no_grad():
        hidden[3, 0] = float("nan")
        hidden[4, 1] = float("inf")  # +-inf logits: inf - inf
        weight[:, 0] = 0.0
        weight[2100, 0] = 1e10
        hidden[5] = 0.0
        hidden[5, 0] = 1e30  # row 5: one +inf logit (the others the bias), in the last tile, its target
        index[5] = 2100
        hidden[6] = 0.0
        # row 6: logits ~1e37 whose tile sums overflow, and a -inf column: finite, not NaN
        hidden[6, 1] = 1e38
        bias[10] = float("-inf")
    ops, _, _ = _run(hidden, weight, index, bias, False, monkeypatch)
    c, _, _ = _run(hidden, weight, index, bias, True, monkeypatch)
    assert c[2].tolist() == ops[2].tolist() and c[2][5]  # top-1, the +inf row's too
    for x, y in zip(c[:2], ops[:2], strict=True):
        assert x[3:6].isnan().all() and y[3:6].isnan().all()
        torch.testing.assert_close(x[[0, 1, 2, 6, 7]], y[[0, 1, 2, 6, 7]], rtol=1e-5, atol=2e-5)


@needs_native
def test_native_folds_stand_aside_where_they_do_not_apply(monkeypatch):
    """A softcap, 16-bit tiles and float64 go through the torch ops (the C folds are float32, no softcap)."""
    hidden, weight, bias, index = _inputs(N=4, V=2100, H=8, seed=2)
    for kw, dtype in ((dict(softcap=5.0), torch.float32), ({}, torch.bfloat16), ({}, torch.float64)):
        args = (hidden.to(dtype), weight.to(dtype), index, bias.to(dtype), True, monkeypatch)
        _, _, calls = _run(*args, **kw)
        assert calls == 0, (kw, dtype)
