"""The SwiGLU MLP's elementwise work in C (posttrain/kernels/native_exact.c, rl/swiglu.py) against torch's ops,
bit for bit: the kernels alone on lengths that take one or several of torch's chunks and scalar remainders, at
one and two threads, over exp's range and its edges; the MLP's gradients through a model; the self-check that
keeps them off where they would differ; and where they stand aside."""

import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from posttrain.data import embedded
from posttrain.kernels import native
from posttrain.rl import swiglu

needs_exact = pytest.mark.skipif(
    native.exact_library() is None, reason="the exact kernels are not built here"
)


def test_built_where_a_compiler_and_vectorised_torch_exist():
    if (
        not any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))
        or os.environ.get("POSTTRAIN_NATIVE") == "0"
    ):
        pytest.skip("no C compiler, or switched off")
    if torch.backends.cpu.get_cpu_capability() not in native._BLOCK:
        pytest.skip("torch runs without AVX2 / AVX-512 kernels here")
    assert native.exact_library() is not None


@needs_exact
def test_torchs_avx2_kernels_are_matched_too():
    """A CPU without AVX-512 runs torch's AVX2 loops (blocks of 16): the kernels pass the check there too (torch
    takes that path here when told to), the RMSNorm's (rl/rmsnorm.py) and rotary embedding's (rl/rope.py) too."""
    script = (
        "import torch\nfrom posttrain.kernels import native\nx = torch.randn(3, 1003)\n"
        "print(torch.backends.cpu.get_cpu_capability(), native.exact_library() is not None,\n"
        "      native.rmsnorm_applies(x, x[0]), native.rope_applies(torch.randn(1, 1, 3, 1002),\n"
        "      *[torch.randn(1, 3, 1002)] * 2))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.stdout.split() == ["AVX2", "True", "True", "True"], done.stderr[-2000:]


def _bits_equal(a, b) -> bool:
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@needs_exact
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 31, 33, 1000, 32768, 32769, 65536 + 17, 100003, 3 * 32768 + 5])
def test_swiglu_kernels_equal_torchs_ops_bit_for_bit(n, threads):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 15
    edges = torch.tensor([0.0, -0.0, 88.7, -88.7, 104.0, -104.0, 104.5, -104.5, float("inf"), -float("inf")])
    x[: min(n, len(edges))] = edges[: min(n, len(edges))]
    x[n // 2] = float("nan")
    u, dy = torch.randn(n, generator=g), torch.randn(n, generator=g)
    with _threads(threads), torch.no_grad():  # as inside autograd's Function, where they run
        a = F.silu(x)
        want_h, want_dg, want_du = a * u, torch.ops.aten.silu_backward(dy * u, x), dy * a
        h = native.swiglu_forward(x, u)
        dh = dy.clone()
        h2, dg, du = native.swiglu_backward(x, u, dh)
        u2, dh2 = u.clone(), dy.clone()  # no h, and du over u (as the MLP's backward asks where it may)
        none, dg2, du2 = native.swiglu_backward(x, u2, dh2, want_h=False, du_into_u=True)
    assert dg is dh and dg2 is dh2 and du2 is u2 and none is None  # written over dh and u
    for got, want in (
        (h, want_h),
        (h2, want_h),
        (dg, want_dg),
        (du, want_du),
        (dg2, want_dg),
        (du2, want_du),
    ):
        assert _bits_equal(got, want)


@needs_exact
def test_the_self_check_refuses_kernels_that_differ(monkeypatch):
    """Vectorised blocks of another width, or torch's chunks for another thread count, put other elements in the
    scalar remainders (libm's exp): the check that gates the kernels sees either."""
    lib, check = native._exact_built(), native._agrees.__wrapped__
    with _threads(2):
        assert check(lib, 2)
        right = lib.block
        try:
            lib.block = 16 if right == 32 else 32
            assert not check(lib, 2)
        finally:
            lib.block = right
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # the kernels chunk for 3, torch for 2
        assert not check(lib, 2)


@needs_exact
def test_they_stay_out_of_a_backward_that_builds_a_graph():
    """create_graph: outputs with no graph would silently drop the second derivatives."""
    g, u = torch.randn(3, 40), torch.randn(3, 40)
    with torch.enable_grad():
        assert (
            native.swiglu_forward(g, u) is None and native.swiglu_backward(g, u, torch.randn(3, 40)) is None
        )


@needs_exact
def test_the_mlp_takes_the_kernels_and_keeps_autograds_numbers(monkeypatch):
    model = embedded.build_model(seed=0, num_hidden_layers=2, intermediate_size=96)
    ids = torch.randint(1, 128, (3, 37), generator=torch.Generator().manual_seed(1))

    def run(c: bool):
        calls = []
        with monkeypatch.context() as m:
            for name in ("swiglu_forward", "swiglu_backward"):
                real = getattr(native, name)
                m.setattr(
                    native,
                    name,
                    (lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
                    if c
                    else (lambda *a, **k: None),
                )
            model.zero_grad(set_to_none=True)
            with swiglu.lean_mlps(model):
                logits = model(input_ids=ids).logits
            (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    c_logits, c_grads, c_calls = run(True)
    logits, grads, _ = run(False)
    assert c_calls == 2 * 3  # each layer's forward, and its backward's h and gradients
    assert torch.equal(c_logits, logits)
    for name, grad in grads.items():
        assert torch.equal(c_grads[name], grad), name


@needs_exact
@torch.no_grad()
def test_they_stand_aside_where_they_do_not_apply(monkeypatch):
    g, u = torch.randn(4, 6), torch.randn(4, 6)
    assert native.swiglu_forward(g, u) is not None
    assert native.swiglu_forward(g.double(), u.double()) is None
    assert native.swiglu_forward(g.t(), u.t()) is None  # not contiguous
    assert native.swiglu_forward(g, u[:, :3].contiguous()) is None
    assert native.swiglu_forward(g[:0], u[:0]) is None
    dh = torch.randn(4, 6)
    assert native.swiglu_backward(g, u, dh.double()) is None
    monkeypatch.setattr(native, "enabled", False)
    before = dh.clone()
    assert native.swiglu_forward(g, u) is None and native.swiglu_backward(g, u, dh) is None
    assert torch.equal(dh, before)
