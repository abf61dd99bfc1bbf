"""CUDA-only checks (skipped without a GPU): flex_attention in bf16 against the fp32 dense reference, and a
compiled bf16 GPT training step against the fp32 eager one. CI has no GPU; these run on a lent device:
`python -m pytest tests/test_cuda.py -v`."""

import pytest
import torch
import torch.nn.functional as F

from megacontext.mega_attention import build_mega_layout, flex_mega_attention, mega_block_mask, mega_mask
from nanochat.gpt import GPT, config_for_depth

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("N,K,W", [(4096, 32, 256), (2000, 8, 100), (8192, 16, 512)])
def test_flex_bf16_matches_dense_fp32_forward_and_backward(N, K, W):
    lay = build_mega_layout(N, K, W)
    g = torch.Generator().manual_seed(0)
    q, k, v, up = [torch.randn(1, 4, lay.T, 64, generator=g).cuda() for _ in range(4)]
    q32, k32, v32 = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mega_mask(lay, "cuda"))
    ref_grads = torch.autograd.grad((ref * up).sum(), (q32, k32, v32))
    q16, k16, v16 = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    out = flex_mega_attention(q16, k16, v16, mega_block_mask(lay, "cuda", 128))
    grads = torch.autograd.grad((out.float() * up).sum(), (q16, k16, v16))
    errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]
    print(f"N={N} K={K} W={W} relative error out/dq/dk/dv: " + " ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 1e-2, errs


def test_compiled_bf16_gpt_step_matches_fp32_eager():
    torch.manual_seed(0)
    model = GPT(config_for_depth(4, 8192, 1024)).cuda()
    model.init_weights()
    x = torch.randint(0, 8192, (4, 1024), device="cuda")
    y = torch.roll(x, -1, 1)
    ref = model(x, targets=y)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    compiled = torch.compile(model, dynamic=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(x, targets=y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    print(f"loss fp32 eager {ref.item():.5f} vs bf16 compiled {loss.item():.5f}")
    assert abs(loss.item() - ref.item()) < 1e-2
    worst = max(rel_err(a, b) for a, b in zip(grads, ref_grads) if b.norm() > 0)
    assert worst < 5e-2, worst
