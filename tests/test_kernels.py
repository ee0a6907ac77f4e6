"""Kernels and their torch references against float64 formulas written independently here.

CPU: the references (forward and autograd gradients), their explicit backwards, megatron layout
compatibility, the custom ops under opcheck and torch.compile. GPU (skipped without CUDA): each
CUDA kernel, with outputs pre-filled with NaN, and the public API's gradients.
"""

from __future__ import annotations

import logging

import pytest
import torch

import melama_mcore.kernels as kernels
from melama_mcore.kernels import ops, reference  # noqa: F401  (ops registers melama::*)

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


# ---- float64 formulas ---------------------------------------------------------------------------
def rms_norm64(x, w, eps=EPS):
    x, w = x.double(), w.double()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * w


def swiglu64(x):
    x = x.double()
    f = x.shape[-1] // 2
    gate, up = x[..., :f], x[..., f:]
    return gate / (1 + torch.exp(-gate)) * up


def rotary64(t, freqs):
    """out_lo = a cos(f_lo) - b sin(f_lo), out_hi = b cos(f_hi) + a sin(f_hi); rest unchanged."""
    t, f = t.double(), freqs.double()
    rot = f.shape[-1]
    h = rot // 2
    a, b = t[..., :h], t[..., h:rot]
    lo = a * torch.cos(f[..., :h]) - b * torch.sin(f[..., :h])
    hi = b * torch.cos(f[..., h:]) + a * torch.sin(f[..., h:])
    return torch.cat([lo, hi, t[..., rot:]], -1)


def assert_close64(actual, expected, dtype):
    """`actual` (any dtype) within dtype's tolerance of the float64 `expected`, no NaN."""
    assert not torch.isnan(actual).any(), "NaN in output (unwritten or invalid elements)"
    tol = TOL[dtype]
    scale = expected.abs().max().clamp(min=1).item()
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=tol, atol=tol * scale)


def grads64(fn, *inputs, dy):
    """Float64 autograd gradients of sum(fn(inputs) * dy)."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    (fn(*leaves) * dy.double()).sum().backward()
    return [leaf.grad for leaf in leaves]


def xent64(logits, target):
    """Cross-entropy per row, float64: logsumexp(x) - x[target]."""
    x = logits.double()
    return torch.logsumexp(x, -1) - x.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def xent_stats64(logits, target, vocab_start):
    """(max, sum exp(x - max), target logit or 0) of one vocabulary slice, float64."""
    x = logits.double()
    m = x.max(-1).values
    local = target - vocab_start
    inside = (local >= 0) & (local < x.shape[-1])
    picked = x.gather(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.stack([m, torch.exp(x - m.unsqueeze(-1)).sum(-1), picked * inside], -1)


def megatron_freqs(s, rot, device="cpu"):
    """Angles laid out as megatron's RotaryEmbedding returns them: cat(f, f) -> [s, 1, 1, rot]."""
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot)
    f = torch.outer(torch.arange(s, dtype=torch.float32, device=device), inv)
    return torch.cat([f, f], -1)[:, None, None, :]


RMS_SHAPES = [(3, 1000), (2, 5, 8191), (7, 64), (1, 1)]
SWIGLU_SHAPES = [(3, 2000), (2, 3, 2 * 8191), (5, 128), (1, 2)]
# (s, b, h, d, rot): full, partial and odd rotary dims
ROTARY_SHAPES = [(5, 2, 3, 128, 128), (7, 1, 4, 64, 32), (3, 2, 1, 10, 6), (4, 3, 2, 128, 64)]
# (rows..., vocab slice): odd and vector-width slices
XENT_SHAPES = [(7, 1001), (3, 2, 4000), (1, 1), (5, 64)]


# ---- CPU: references ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_fp32", [True, False])
def test_reference_rms_norm(shape, dtype, w_fp32):
    x = torch.randn(shape, dtype=dtype) * 3
    w = (torch.rand(shape[-1]) + 0.5).to(torch.float32 if w_fp32 else dtype)
    dy = torch.randn(shape, dtype=dtype)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = reference.rms_norm(xr, wr, EPS)
    assert y.dtype == dtype
    assert_close64(y, rms_norm64(x, w), dtype)
    y.backward(dy)
    dx64, dw64 = grads64(rms_norm64, x, w, dy=dy)
    assert_close64(xr.grad, dx64, dtype)
    assert_close64(wr.grad, dw64, w.dtype)
    _, rstd = reference.rms_norm_with_rstd(x, w, EPS)
    dx, dw = reference.rms_norm_backward(dy, x, w, rstd)
    assert (dx.dtype, dw.dtype) == (dtype, w.dtype)
    assert_close64(dx, dx64, dtype)
    assert_close64(dw, dw64, w.dtype)


@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_swiglu(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3
    dy = torch.randn(*shape[:-1], shape[-1] // 2, dtype=dtype)
    xr = x.clone().requires_grad_()
    y = reference.swiglu(xr)
    assert y.dtype == dtype and y.shape == dy.shape
    assert_close64(y, swiglu64(x), dtype)
    y.backward(dy)
    (dx64,) = grads64(swiglu64, x, dy=dy)
    assert_close64(xr.grad, dx64, dtype)
    assert_close64(reference.swiglu_backward(dy, x), dx64, dtype)


@pytest.mark.parametrize("shape", ROTARY_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("megatron_layout", [True, False])
def test_reference_rotary(shape, dtype, megatron_layout):
    s, b, h, d, rot = shape
    # Independent halves check that the backward pairs each sine with the right element.
    freqs = megatron_freqs(s, rot) if megatron_layout else torch.randn(s, 1, 1, rot) * 3
    t = torch.randn(s, b, h, d, dtype=dtype)
    dy = torch.randn(s, b, h, d, dtype=dtype)
    tr = t.clone().requires_grad_()
    y = reference.apply_rotary(tr, freqs)
    assert y.dtype == dtype
    assert_close64(y, rotary64(t, freqs), dtype)
    y.backward(dy)
    dt64, _ = grads64(rotary64, t, freqs, dy=dy)
    assert_close64(tr.grad, dt64, dtype)
    assert_close64(reference.apply_rotary_backward(dy, freqs), dt64, dtype)


@pytest.mark.parametrize("shape", XENT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_cross_entropy(shape, dtype):
    x = (torch.randn(shape) * 4).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1])
    leaf = x.clone().requires_grad_()
    loss = kernels.vocab_parallel_cross_entropy(leaf, target)
    assert loss.dtype == torch.float32
    assert_close64(loss, xent64(x, target), torch.float32)  # fp32 arithmetic on exact inputs
    dy = torch.randn(shape[:-1])
    loss.backward(dy)
    (dx64,) = grads64(lambda t: xent64(t, target), x, dy=dy)
    assert_close64(leaf.grad, dx64, dtype)


@pytest.mark.parametrize("world", [2, 3])
def test_cross_entropy_vocabulary_slices_combine_to_the_full_softmax(world):
    """Each rank's stats over its slice (targets mostly in other slices) combine into the
    full-vocabulary loss, and each slice's gradient is its part of the full gradient."""
    from melama_mcore.kernels.cross_entropy import combine_stats

    v = 37
    x = torch.randn(6, world * v) * 5
    target = torch.randint(0, world * v, (6,))
    stats = [reference.xent_stats(x[:, r * v:(r + 1) * v], target, r * v) for r in range(world)]
    for r in range(world):
        assert_close64(stats[r], xent_stats64(x[:, r * v:(r + 1) * v], target, r * v), torch.float32)
    lse, loss = combine_stats(torch.stack(stats))
    assert_close64(loss, xent64(x, target), torch.float32)
    dy = torch.randn(6)
    (dx64,) = grads64(lambda t: xent64(t, target), x, dy=dy)
    for r in range(world):
        part = reference.xent_backward(dy, x[:, r * v:(r + 1) * v], target, lse, r * v)
        assert_close64(part, dx64[:, r * v:(r + 1) * v], torch.float32)


def test_reference_matches_megatron_layouts():
    """Same conventions as megatron-core's own rotate-half RoPE and SwiGLU ([gate | up])."""
    from megatron.core.fusions.fused_bias_swiglu import swiglu as megatron_swiglu
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    t = torch.randn(6, 2, 4, 64)
    freqs = megatron_freqs(6, 32)
    expected = _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False)
    torch.testing.assert_close(reference.apply_rotary(t, freqs), expected)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(reference.swiglu(x), megatron_swiglu(x))


# ---- CPU: custom ops and public API -------------------------------------------------------------
def _op_cases():
    x = torch.randn(4, 6, 32, requires_grad=True)
    t = torch.randn(5, 2, 3, 16, requires_grad=True)
    freqs = megatron_freqs(5, 8)
    rstd = reference.rms_norm_with_rstd(x, torch.ones(32), EPS)[1].detach()
    return [
        (torch.ops.melama.rms_norm.default, (x, torch.rand(32, requires_grad=True), EPS)),
        (torch.ops.melama.rms_norm_backward.default,
         (torch.randn(4, 6, 32), x.detach(), torch.rand(32), rstd)),
        (torch.ops.melama.swiglu.default, (x,)),
        (torch.ops.melama.swiglu_backward.default, (torch.randn(4, 6, 16), x.detach())),
        (torch.ops.melama.rotary.default, (t, freqs)),
        (torch.ops.melama.rotary_backward.default, (torch.randn(5, 2, 3, 16), freqs)),
        (torch.ops.melama.xent_stats.default, (x.detach(), torch.randint(0, 64, (4, 6)), 16)),
        (torch.ops.melama.xent_backward.default,
         (torch.randn(4, 6), x.detach(), torch.randint(0, 64, (4, 6)), torch.rand(4, 6) + 4, 16)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_custom_ops_opcheck(case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


def test_custom_op_autograd_matches_reference():
    x = torch.randn(3, 40, requires_grad=True)
    w = torch.rand(40, requires_grad=True)
    dy = torch.randn(3, 40)
    torch.ops.melama.rms_norm(x, w, EPS)[0].backward(dy)
    dx64, dw64 = grads64(rms_norm64, x, w, dy=dy)
    assert_close64(x.grad, dx64, torch.float32)
    assert_close64(w.grad, dw64, torch.float32)


def test_public_api_falls_back_on_cpu_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_logged", set())
    caplog.set_level(logging.INFO, logger="melama_mcore.kernels")
    x = torch.randn(3, 2, 4, 8)
    w = torch.rand(8)
    freqs = megatron_freqs(3, 8)
    for _ in range(2):
        torch.testing.assert_close(kernels.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS))
        torch.testing.assert_close(kernels.swiglu(x), reference.swiglu(x))
        torch.testing.assert_close(kernels.apply_rotary(x, freqs),
                                   reference.apply_rotary(x, freqs))
    if not torch.cuda.is_available():
        assert kernels.backend() == "torch"
    fallbacks = [r for r in caplog.records if "torch reference" in r.getMessage()]
    assert len(fallbacks) == 1, [r.getMessage() for r in fallbacks]
    if not torch.cuda.is_available():  # the machine's fact, not a fault: rank 0 says it, no rank warns
        assert fallbacks[0].levelno == logging.INFO


def test_public_api_traces_under_torch_compile():
    def block(x, w, freqs):
        h = kernels.rms_norm(x, w, EPS)
        return kernels.swiglu(kernels.apply_rotary(h, freqs))

    x, w, freqs = torch.randn(3, 2, 4, 16), torch.rand(16), megatron_freqs(3, 16)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, freqs), block(x, w, freqs))


def test_start_up_self_check_passes_and_names_a_disagreeing_kernel(monkeypatch):
    """On CPU the ops run the reference, so the check passes; a kernel 1% off is named."""
    from melama_mcore.kernels import self_check

    assert self_check.first_mismatch(torch.device("cpu")) is None

    def cases(device):
        x = torch.randn(4, 8)
        yield "exact", lambda t: t * 2, lambda t: t * 2, (x,)
        yield "off_by_1pct", lambda t: t * 2.02, lambda t: t * 2, (x,)

    monkeypatch.setattr(self_check, "_cases", cases)
    assert self_check.first_mismatch(torch.device("cpu")).startswith("off_by_1pct output")


def test_kernels_failing_the_self_check_fall_back_to_the_reference(monkeypatch):
    from melama_mcore.kernels import _lib, self_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_lib, "load", lambda: None)
    monkeypatch.setattr(self_check, "first_mismatch", lambda device: "rotary grad 0: max abs error 3")
    name, reason = kernels._resolve()
    assert name == "torch" and "disagrees with the reference" in reason and "rotary grad 0" in reason


def test_build_cache_builds_once_per_key(tmp_path, monkeypatch):
    from melama_mcore.kernels import build

    monkeypatch.setenv("MELAMA_KERNELS_CACHE", str(tmp_path))
    built = []

    def fake_compile(out, archs):
        built.append(archs)
        out.write_bytes(b"so")
        return out

    monkeypatch.setattr(build, "compile_to", fake_compile)
    first = build.library_path(("80", "90"))
    assert build.library_path(("80", "90")) == first and built == [("80", "90")]
    assert first.parent.parent == tmp_path and first.parent.name == build.source_hash(("80", "90"))
    assert build.library_path(("100",)) != first and len(built) == 2


# ---- GPU: the CUDA kernels ----------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def lib():
    if kernels.backend() != "cuda":
        pytest.fail(f"CUDA is available but the kernels did not load: {kernels._state}")
    from melama_mcore.kernels import _lib

    return _lib


def nan_like(t, shape=None, dtype=None):
    return torch.full(shape or t.shape, float("nan"), device=t.device, dtype=dtype or t.dtype)


GPU_RMS_SHAPES = RMS_SHAPES + [(33, 8192), (9, 16384), (300, 128)]


@needs_cuda
@pytest.mark.parametrize("shape", GPU_RMS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_fp32", [True, False])
def test_cuda_rms_norm(lib, shape, dtype, w_fp32):
    x = torch.randn(shape, device="cuda", dtype=dtype) * 3
    w = (torch.rand(shape[-1], device="cuda") + 0.5).to(torch.float32 if w_fp32 else dtype)
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    y, rstd = nan_like(x), nan_like(x, x.shape[:-1], torch.float32)
    lib.rms_norm_fwd(x, w, EPS, y, rstd)
    assert_close64(y, rms_norm64(x, w), dtype)
    dx, dw = nan_like(x), nan_like(w)
    lib.rms_norm_bwd(dy, x, w, rstd, dx, dw)
    dx64, dw64 = grads64(rms_norm64, x, w, dy=dy)
    assert_close64(dx, dx64, dtype)
    assert_close64(dw, dw64, w.dtype)
    dw_again = nan_like(w)
    lib.rms_norm_bwd(dy, x, w, rstd, nan_like(x), dw_again)
    assert torch.equal(dw, dw_again), "dw reduction is not deterministic"


@needs_cuda
@pytest.mark.parametrize("shape", SWIGLU_SHAPES + [(17, 2 * 3584)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_swiglu(lib, shape, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype) * 3
    dy = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda", dtype=dtype)
    y = nan_like(dy)
    lib.swiglu_fwd(x, y)
    assert_close64(y, swiglu64(x), dtype)
    dx = nan_like(x)
    lib.swiglu_bwd(dy, x, dx)
    (dx64,) = grads64(swiglu64, x, dy=dy)
    assert_close64(dx, dx64, dtype)


@needs_cuda
@pytest.mark.parametrize("shape", ROTARY_SHAPES + [(64, 2, 64, 128, 128), (9, 1, 1, 128, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("megatron_layout", [True, False])
def test_cuda_rotary(lib, shape, dtype, megatron_layout):
    s, b, h, d, rot = shape
    freqs = (megatron_freqs(s, rot, "cuda") if megatron_layout
             else torch.randn(s, 1, 1, rot, device="cuda") * 3)
    angles = freqs.reshape(s, rot).contiguous()
    t = torch.randn(s, b, h, d, device="cuda", dtype=dtype)
    out = nan_like(t)
    lib.rotary(t, angles, out)
    assert_close64(out, rotary64(t, freqs), dtype)
    dy = torch.randn_like(t)
    dt = nan_like(t)
    lib.rotary(dy, angles, dt, backward=True)
    dt64, _ = grads64(rotary64, t, freqs, dy=dy)
    assert_close64(dt, dt64, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_rotary_gqa_strided_heads(lib, dtype):
    """q and k of megatron's fused QKV: per group [q heads | k | v], split along the last dim,
    so k has non-contiguous heads; kernels apply per tensor whatever the head counts."""
    s, b, groups, q_per_group, d = 6, 2, 2, 4, 128
    qkv = torch.randn(s, b, groups, (q_per_group + 2) * d, device="cuda", dtype=dtype)
    q = qkv[..., : q_per_group * d].reshape(s, b, groups * q_per_group, d)
    k = qkv[..., q_per_group * d : (q_per_group + 1) * d]
    assert not k.is_contiguous()
    freqs = megatron_freqs(s, d, "cuda")
    for t in (q, k):
        out = kernels.apply_rotary(t, freqs)
        assert out.shape == t.shape
        assert_close64(out, rotary64(t, freqs), dtype)


@needs_cuda
def test_cuda_unaligned_pointers_take_the_scalar_path(lib):
    """Tensors starting one element past an aligned address must still be right."""
    x = torch.randn(5 * 64 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(5, 64)
    w = torch.rand(65, device="cuda")[1:]
    y, rstd = nan_like(x), nan_like(x, (5,), torch.float32)
    lib.rms_norm_fwd(x, w, EPS, y, rstd)
    assert_close64(y, rms_norm64(x, w), torch.bfloat16)
    z = nan_like(x, (5, 32))
    lib.swiglu_fwd(x, z)
    assert_close64(z, swiglu64(x), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_public_api_gradients(lib, dtype):
    assert kernels.backend() == "cuda"
    x = torch.randn(4, 3, 2, 256, device="cuda", dtype=dtype)
    w = torch.rand(256, device="cuda")
    freqs = megatron_freqs(4, 128, "cuda")

    def block(x, w, freqs, rms, rot, glu):
        return glu(rot(rms(x, w, EPS), freqs))

    def block64(x, w, freqs):
        return block(x, w, freqs, rms_norm64, rotary64, swiglu64)

    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    y = block(*leaves, freqs, kernels.rms_norm, kernels.apply_rotary, kernels.swiglu)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close64(y, block64(x, w, freqs), dtype)
    dx64, dw64, _ = grads64(block64, x, w, freqs, dy=dy)
    # three ops chained in low precision: allow the rounding of each step
    assert_close64(leaves[0].grad, dx64, dtype if dtype == torch.float32 else torch.bfloat16)
    assert_close64(leaves[1].grad, dw64, dtype if dtype == torch.float32 else torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("shape", XENT_SHAPES + [(33, 32000), (9, 4096), (2, 128256)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab_start", [0, 500])
def test_cuda_cross_entropy(lib, shape, dtype, vocab_start):
    """Stats and gradient of one vocabulary slice; with vocab_start 500 some targets fall
    outside the slice (no onehot term, target logit 0)."""
    x = (torch.randn(shape, device="cuda") * 4).to(dtype)
    v = shape[-1]
    target = torch.randint(vocab_start // 2, vocab_start + v, shape[:-1], device="cuda")
    stats = nan_like(x, (*shape[:-1], 3), torch.float32)
    lib.xent_fwd(x, target, vocab_start, stats)
    expected = xent_stats64(x, target, vocab_start)
    assert_close64(stats, expected, torch.float32)
    lse = (expected[..., 0] + torch.log(expected[..., 1]) + torch.rand(shape[:-1], device="cuda",
                                                                          dtype=torch.float64))
    dloss = torch.randn(shape[:-1], device="cuda")
    dx = nan_like(x)
    lib.xent_bwd(x, target, lse.float().contiguous(), dloss, vocab_start, dx)
    local = (target - vocab_start).unsqueeze(-1)
    onehot = torch.zeros(shape, device="cuda", dtype=torch.float64).scatter(
        -1, local.clamp(0, v - 1), ((local >= 0) & (local < v)).double())
    dx64 = (torch.exp(x.double() - lse.unsqueeze(-1)) - onehot) * dloss.double().unsqueeze(-1)
    assert_close64(dx, dx64, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_cross_entropy_public_api_and_unaligned_logits(lib, dtype):
    x = (torch.randn(4 * 3 * 1000 + 1, device="cuda") * 4).to(dtype)[1:].view(4, 3, 1000)
    target = torch.randint(0, 1000, (4, 3), device="cuda")
    leaf = x.clone().requires_grad_()
    loss = kernels.vocab_parallel_cross_entropy(leaf, target)
    dy = torch.randn(4, 3, device="cuda")
    loss.backward(dy)
    assert_close64(loss, xent64(x, target), torch.float32)
    (dx64,) = grads64(lambda t: xent64(t, target), x, dy=dy)
    assert_close64(leaf.grad, dx64, dtype)
    stats = nan_like(x, (4, 3, 3), torch.float32)
    lib.xent_fwd(x, target, 0, stats)  # x itself starts one element past an aligned address
    assert_close64(stats, xent_stats64(x, target, 0), torch.float32)
