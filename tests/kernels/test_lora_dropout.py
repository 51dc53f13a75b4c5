"""LoRA dropout fused into the adapter's matmuls: each kernel against its twin given the same keep mask,
the mask's statistics, and the layer built on them against autograd through the plain formula."""

import pytest
import torch
from kernel_inputs import DEVICES, INTERPRETED, randn

from qlora import ops
from qlora.kernels import lora_dropout as ld
from qlora.lora import LoRALinear, LoraSpec, QuantSpec

# odd sizes: partial row, column and rank blocks; r = 64 as the QLoRA defaults
CASES = [(70, 150, 13, 0.3), (33, 96, 64, 0.1), (130, 64, 8, 0.5)]


def seed_on(device, value=12345):
    return torch.tensor([value], dtype=torch.int64, device=device)


def close(got, want, rel=1e-2):
    """bf16 outputs: within about one bf16 step of the twin (accumulation order differs on the GPU)."""
    torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * want.float().abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_rows,n_in,rank,p", CASES, ids=str)
def test_each_kernel_equals_its_twin_with_the_same_mask(n_rows, n_in, rank, p, device):
    x = randn((n_rows, n_in), torch.bfloat16, seed=1, device=device)
    a = randn((rank, n_in), torch.bfloat16, seed=2, device=device, scale=0.1)
    g = randn((n_rows, rank), torch.bfloat16, seed=3, device=device)
    dx = randn((n_rows, n_in), torch.bfloat16, seed=4, device=device)
    seed = seed_on(device)
    keep = ld.keep_mask(seed, n_rows, n_in, p)
    close(ld.dropout_project(x, a, seed, p), ld.dropout_project_twin(x, a, keep, p))
    close(ld.dropout_project_grad(g, x, seed, p), ld.dropout_project_grad_twin(g, x, keep, p), rel=1e-3)
    got = ld.dropout_expand_add_(dx.clone(), g, a, seed, p)
    close(got, ld.dropout_expand_add_twin_(dx.clone(), g, a, keep, p))
    # negative control: the mask matters, so a twin with another mask disagrees
    other = ld.keep_mask(seed_on(device, 999), n_rows, n_in, p)
    fused = ld.dropout_project(x, a, seed, p).float()
    assert not torch.allclose(ld.dropout_project_twin(x, a, other, p).float(), fused, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_keep_mask_is_a_fair_coin_per_element_and_a_function_of_the_seed(device):
    p = 0.3
    keep = ld.keep_mask(seed_on(device), 200, 500, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01  # 100,000 draws: sd 0.0014
    assert abs(keep[:, 0].float().mean().item() - (1 - p)) < 0.12  # a column: 200 draws
    assert abs(keep[0].float().mean().item() - (1 - p)) < 0.08  # a row: 500 draws
    assert not torch.equal(keep[0], keep[1])  # rows are not copies of each other
    assert torch.equal(keep, ld.keep_mask(seed_on(device), 200, 500, p))
    assert (keep != ld.keep_mask(seed_on(device, 54321), 200, 500, p)).float().mean() > 0.3


def test_refuses_bad_arguments():
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    a = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        ld.dropout_project(x, a, seed_on("cpu"), 1.0)
    with pytest.raises(ValueError, match="one int64 element"):
        ld.dropout_project(x, a, torch.tensor([1, 2]), 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        ld.dropout_project(x.t(), a, seed_on("cpu"), 0.1)
    assert ld.fits(2048, 4096, 64) and not ld.fits(2048, 4096, 256) and not ld.fits(2**20, 2**12, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_with_fused_dropout_matches_autograd_through_the_formula(device):
    """The layer (training, p = 0.3, bf16, NF4) with the kernels: output and the gradients of x, A and B equal
    autograd through `y = x W^T + scale * drop(x) A^T B^T` with the mask the kernels used."""
    torch.manual_seed(0)
    layer = LoRALinear(96, 80, quant=QuantSpec("nf4"), lora=LoraSpec(r=16, alpha=32, dropout=0.3),
                       dtype=torch.bfloat16, device="cpu")  # fmt: skip
    layer.set_base_weight(torch.randn(80, 96) * 0.05)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    layer.to(device).train()
    x = randn((3, 11, 96), torch.bfloat16, seed=5, device=device).requires_grad_(True)
    with ops.use_implementation("triton"):
        assert ops.lora_dropout_fusable(x, layer.r)
        torch.manual_seed(7)
        y = layer(x)
        y.float().square().sum().backward()
    torch.manual_seed(7)
    seed = torch.randint(2**62, (1,), device=device)  # the draw the layer made
    keep = ld.keep_mask(seed, 33, 96, 0.3).view(3, 11, 96)

    x2 = x.detach().clone().requires_grad_(True)
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    w = layer.dense_base_weight(torch.bfloat16).float()
    dropped = torch.where(keep, x2.float() / 0.7, 0.0).bfloat16().float()
    want = x2.float() @ w.t() + layer.scale * (dropped @ a.t()) @ b.t()
    want.square().sum().backward()
    close(y, want)
    close(x.grad, x2.grad, rel=2e-2)
    close(layer.lora_A.weight.grad, a.grad, rel=2e-2)
    close(layer.lora_B.weight.grad, b.grad, rel=2e-2)


def test_plain_path_keeps_nn_dropout():
    """Without Triton (the CPU default) the layer drops with nn.Dropout; float32 layers never fuse."""
    x = torch.zeros(2, 5, 8, dtype=torch.bfloat16)
    if not INTERPRETED:
        assert not ops.lora_dropout_fusable(x, 4)
    with ops.use_implementation("torch"):
        assert not ops.lora_dropout_fusable(x, 4)
    assert not ops.lora_dropout_fusable(x.float(), 4)
