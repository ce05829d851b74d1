"""grpo.onednn: oneDNN's fp32 GEMMs for F.linear on x86 CPUs: values and gradients equal F.linear's (fp32),
the cases left to torch, and the training step that turns them on."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from grpo import onednn
from grpo.optim import AdamWConfig, build_step

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="oneDNN's GEMMs are used on x86 CPUs only")


@pytest.mark.parametrize("out", [96, 48])  # dW both ways (N > K, N <= K)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 64), (3, 29, 64)])
def test_linear_equals_f_linear_in_values_and_gradients(shape, bias, out):
    torch.manual_seed(0)
    x, w = torch.randn(*shape, requires_grad=True), torch.randn(out, 64, requires_grad=True)
    b = torch.randn(out, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    dy = torch.randn(*shape[:-1], out)
    grads = {}
    for name, ctx in (("torch", contextlib.nullcontext()), ("onednn", onednn.linears())):
        with ctx:
            y = F.linear(x, w, b) if bias else F.linear(x, w)
            grads[name] = (y.detach(), *torch.autograd.grad(y, leaves, dy))
        assert (type(y.grad_fn).__name__ == "LinearBackward") == (name == "onednn")
    for mine, ref in zip(grads["onednn"], grads["torch"]):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_packed_linear_equals_f_linear():
    torch.manual_seed(0)
    x, w = torch.randn(5, 64), torch.randn(300, 64)
    torch.testing.assert_close(onednn.packed_linear(w)(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_other_dtypes_autocast_and_vectors_are_left_to_torch():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with onednn.linears():
        assert F.linear(x.bfloat16(), w.bfloat16()).grad_fn is None  # bf16: torch's (no graph without grads)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert F.linear(x.requires_grad_(), w).dtype == torch.bfloat16  # autocast still applies
        assert F.linear(x[0], w).shape == (6,)  # a vector input: torch's


def test_local_step_trains_through_onednn_unless_layers_recompute():
    model = torch.nn.Linear(8, 4)
    step = build_step(model, AdamWConfig(lr=1e-3), total_steps=1)
    with step.micro_batch(last=True):
        assert type(model(torch.randn(2, 8)).grad_fn).__name__ == "LinearBackward"
    model.is_activation_checkpointing = True  # as transformers' models report it
    with step.micro_batch(last=True):
        assert type(model(torch.randn(2, 8)).grad_fn).__name__ != "LinearBackward"
