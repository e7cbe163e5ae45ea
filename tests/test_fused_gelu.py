"""The fused bias + GELU op (``jowa_core.models.fused_gelu``): the torch reference against autograd through
``F.gelu(h + b)``, the op inside ``torch.compile``, the model's switch, and the Triton kernels on CPU through
Triton's interpreter, their accuracy measured against GELU in float64 (skipped without triton)."""

import contextlib
import textwrap

import pytest
import torch
import torch.nn.functional as F

from jowa_core.models.fused_gelu import KernelConfig, bias_gelu, set_kernel_config
from tests.test_fused_ln import _model_and_batch, check_switch_under_autocast, switch_runs
from tests.triton_interpreter import needs_triton, run_in_interpreter


def _inputs(N: int = 7, C: int = 12, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (2 * torch.randn(N, C, generator=g)).to(dtype).requires_grad_()
    b = torch.randn(C, generator=g).requires_grad_()
    return h, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_gelu_of_h_plus_bias_with_its_gradients(dtype: torch.dtype) -> None:
    """y = F.gelu(h + b) in h's dtype; dh as autograd gives, dbias its column sums, in the bias's dtype (the op
    sums in fp32 before rounding dh: for bf16 h the sums agree to fp32 rounding, not to bf16's)."""
    h, b = _inputs(dtype=dtype)
    y = bias_gelu(h, b)
    ref = F.gelu(h.float() + b).to(dtype)
    assert y.dtype == dtype and torch.equal(y, ref)
    dy = torch.randn(h.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = torch.autograd.grad(y, [h, b], dy)
    want = torch.autograd.grad(ref, [h, b], dy)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0])
    x = (h.detach().double() + b.detach().double()).requires_grad_()
    exact = (dy.double() * torch.autograd.grad(F.gelu(x).sum(), x)[0]).sum(0)
    torch.testing.assert_close(got[1].double(), exact, rtol=1e-5, atol=1e-5)


def test_reference_gradcheck_float64_and_leading_dimensions() -> None:
    h, b = _inputs(3, 5, torch.float64)
    assert torch.autograd.gradcheck(bias_gelu, (h, b.double().detach().requires_grad_()))
    h3 = torch.randn(2, 3, 5, dtype=torch.float64)
    assert bias_gelu(h3, b.double()).shape == (2, 3, 5)
    torch.testing.assert_close(bias_gelu(h3, b.double()), F.gelu(h3 + b.double()))


def test_bad_arguments_are_refused() -> None:
    h, b = _inputs()
    with pytest.raises(ValueError, match=r"bias \(11,\) must be \(12,\)"):
        bias_gelu(h, b[:11])
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(cols=96)
    with pytest.raises(ValueError, match="integer >= 1"):
        KernelConfig(bwd_programs_per_sm=0)
    previous = set_kernel_config(KernelConfig(rows=8))
    assert set_kernel_config(previous) == KernelConfig(rows=8)


def test_op_inside_torch_compile_gives_the_eager_result() -> None:
    """One graph (fullgraph), the op opaque in it, forward and both gradients as eager."""
    h, b = _inputs(9, 20)
    w = torch.randn(20, 6, generator=torch.Generator().manual_seed(4))

    def f(h, b):
        return (bias_gelu(torch.tanh(h) * 3, b) @ w).square().sum()

    want = torch.autograd.grad(f(h, b), [h, b])
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(h, b), [h, b])
    for name, a, e in zip("hb", got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("fused_layer_norm", [False, True])
def test_switch_is_the_same_function_with_the_same_gradients(fused_layer_norm: bool) -> None:
    """``use_fused_bias_gelu``: the same outputs for a window and for cached decoding, the same parameter
    gradients (fp32 on CPU: the op's reference adds the bias after the product instead of inside it), the same
    state dict; and the switch is used: the first Linear's module is no longer called."""
    model, tokens, tasks = _model_and_batch()
    model.use_fused_layer_norm(fused_layer_norm)
    keys = set(model.state_dict())

    @contextlib.contextmanager
    def first_linear_calls():
        seen: list[int] = []
        hook = model.transformer.blocks[1].mlp[0].register_forward_hook(lambda *_: seen.append(1))
        yield seen
        hook.remove()

    (a, ga, ca, na), (b, gb, cb, nb) = switch_runs(
        model, tokens, tasks, "use_fused_bias_gelu", first_linear_calls, count_cached=True
    )
    assert na > 0 and nb == 0 and set(model.state_dict()) == keys
    assert all(blk.fused_bias_gelu for blk in model.transformer.blocks)
    for name in ("hidden", "obs_logits", "q_logits"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cb, ca, atol=1e-6, rtol=1e-5)
    assert ga.keys() == gb.keys() and any(".mlp.0.bias" in n for n in ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-6, rtol=1e-5, msg=n)


def test_switch_keeps_the_dtypes_under_autocast() -> None:
    check_switch_under_autocast("use_fused_bias_gelu")


# --- the Triton kernels, on CPU through Triton's interpreter ----------------------------------

INTERPRETER_CHECK = textwrap.dedent(
    """
    from unittest import mock

    import torch
    import torch.nn.functional as F
    from jowa_core.models import fused_gelu as f

    torch.manual_seed(0)
    # C = 48 and 100: a part-filled column block; N = 37 and 300: part-filled row blocks; C = 3072: jowa_150m's
    # hidden width. Tiles: the default and 8 x 32 with 1 program per "SM" (2 on CPU), so that the backward's
    # programs stride over many row blocks and several column blocks.
    cases = [(f.KernelConfig(), 37, 48), (f.KernelConfig(), 5, 3072), (f.KernelConfig(8, 32, 2, 1), 300, 100)]
    for cfg, N, C in cases:
        f.set_kernel_config(cfg)
        for dtype in (torch.float32, torch.bfloat16):
            h, b, dy = (2 * torch.randn(N, C)).to(dtype), torch.randn(C), torch.randn(N, C).to(dtype)
            y, (dh, db) = f._triton_forward(h, b), f._triton_backward(dy, h, b)
            ry, (rdh, rdb) = f._reference_forward(h, b), f._reference_backward(dy, h, b)
            tag = f"N={N} C={C} {dtype}"
            assert y.dtype == dh.dtype == dtype and db.dtype == torch.float32, tag
            # bf16: the interpreter rounds toward zero (a GPU to nearest), one unit in the last place apart
            tol = {"rtol": 1.6e-2, "atol": 1e-5} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 2e-6}
            torch.testing.assert_close(y, ry, **tol, msg=f"y {tag}")
            torch.testing.assert_close(dh, rdh, **tol, msg=f"dh {tag}")
            torch.testing.assert_close(db, rdb, rtol=1e-5, atol=2e-5 * N ** 0.5, msg=f"db {tag}")

    # accuracy against GELU in float64 over [-12, 12], fp32 in and out: the kernels' erf (Abramowitz & Stegun
    # 7.1.26) against aten's fp32 gelu, i.e. what inductor's kernels compute today
    f.set_kernel_config(f.KernelConfig())
    x = torch.linspace(-12, 12, 48_000).view(-1, 16)
    zero = torch.zeros(16)
    exact = F.gelu(x.double())
    xg = x.double().requires_grad_()
    dexact = torch.autograd.grad(F.gelu(xg).sum(), xg)[0]
    err = (f._triton_forward(x, zero).double() - exact).abs().max().item()
    aten_err = (F.gelu(x).double() - exact).abs().max().item()
    derr = (f._triton_backward(torch.ones_like(x), x, zero)[0].double() - dexact).abs().max().item()
    print(f"max abs error: forward {err:.2e} (aten fp32 {aten_err:.2e}), derivative {derr:.2e}")
    assert err < 6e-7 and err <= aten_err, (err, aten_err)
    assert derr < 6e-7, derr
    # the kernels through the public op and autograd, as on a GPU: torch.library checks what the op returns (session
    # 21's LayerNorm backward returned outputs that shared storage, and only CUDA runs saw it)
    h, b, dy = torch.randn(2, 7, 48).requires_grad_(), torch.randn(48).requires_grad_(), torch.randn(2, 7, 48)
    with mock.patch.object(f, "_use_triton", lambda t: True):
        got = torch.autograd.grad(f.bias_gelu(h, b), (h, b), dy)
    want = torch.autograd.grad(f.bias_gelu(h, b), (h, b), dy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    print("interpreter check passed")
    """
)


@needs_triton
def test_triton_kernels_match_the_reference_in_the_interpreter() -> None:
    print(run_in_interpreter(INTERPRETER_CHECK).splitlines()[0])  # the accuracy figures
