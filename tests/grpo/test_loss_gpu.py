"""The blocked output layer (``grpo.loss.head_logprobs_and_entropy``) on CUDA: the same values and gradients as the
materialised logits in fp32 at the GPU's default tiles and at tiles that divide neither the rows nor the vocabulary,
and the forward's own bf16 logits under autocast (the trainer's bf16 path)."""
import pytest
import torch
import torch.nn.functional as F

from grpo.loss import head_logprobs_and_entropy
from tests.grpo.test_loss import check_head_against_materialised

pytestmark = pytest.mark.gpu


def inputs(n: int, length: int, d: int, vocab: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, length, d, generator=g, device="cuda", requires_grad=True)
    w = (torch.randn(vocab, d, generator=g, device="cuda") * 0.3).requires_grad_()
    ids = torch.randint(0, vocab, (n, length), generator=g, device="cuda")
    return h, w, ids, torch.randn(n, length, generator=g, device="cuda")


@pytest.mark.parametrize("rows,cols", [(None, None), (37, None), (37, 1000), (512, 4099)])
def test_blocked_head_equals_the_materialised_logits_in_fp32(rows, cols):
    h, w, ids, weights = inputs(4, 300, 64, 12_345)
    # TF32 is off: fp32 GEMMs of other shapes
    check_head_against_materialised(h, w, ids, weights, rows, cols, dict(rtol=1e-5, atol=1e-4),
                                    dict(rtol=1e-4, atol=1e-5))


def test_blocked_head_under_bf16_autocast_uses_the_forwards_logits():
    h, w, ids, weights = inputs(2, 200, 64, 5_000)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp, _ = head_logprobs_and_entropy(h, w, ids, 0.7, rows=97, cols=1_500)
    grad_h, = torch.autograd.grad((logp * weights).sum(), h)
    z = F.linear(h.detach().bfloat16(), w.detach().bfloat16()).float()
    ref = torch.log_softmax(z / 0.7, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-4)
    gz = (F.one_hot(ids, 5_000) - torch.softmax(z / 0.7, dim=-1)) * (weights / 0.7)[..., None]
    torch.testing.assert_close(grad_h, gz @ w.detach(), rtol=2e-2, atol=2e-3)  # d h: a bf16 GEMM per tile
