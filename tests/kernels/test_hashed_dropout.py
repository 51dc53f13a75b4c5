"""The hashed dropout mask (`qlora.lora.dropout`) and the kernels that apply it while reading x
(`qlora.kernels.hashed_dropout`, and the masked input gradient): the mask's statistics, the kernels'
mask equal to the twin's bit for bit, both products against float64 on odd shapes with and without
the split reduction, determinism, and the counters left at zero."""

import pytest
import torch
from kernel_inputs import DEVICES, randn

from qlora import ops
from qlora.kernels import hashed_dropout as kernels
from qlora.kernels.masked_lowrank import add_masked_lowrank_
from qlora.lora.dropout import HashedDropout
from qlora.ops import KernelPolicy

TWINS, FORCED = KernelPolicy(kernels="torch"), KernelPolicy(kernels="triton")

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2**-6),
             torch.float64: dict(rtol=1e-7, atol=1e-9)}  # float64: the scale arrives as a float32 scalar  # fmt: skip


def mask(p=0.3, seed=(12345, 678), device="cpu"):
    return HashedDropout(torch.tensor(seed, dtype=torch.int64, device=device), p)


# --- the mask itself (the twin) ---------------------------------------------------------------
@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_mask_drops_at_rate_p_independently_of_neighbours(p):
    keep = mask(p).keep(512, 1024).double()
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(1 - keep.mean().item() - p) < 5 * sigma
    q = (1 - p) ** 2  # both of two independent elements kept
    sigma_pair = (q * (1 - q) / n) ** 0.5
    # neighbours in a row, the two halves of one hash (columns 2k, 2k + 1), rows, diagonals
    for both in ((keep[:, 1:] * keep[:, :-1]).mean(), (keep[:, 0::2] * keep[:, 1::2]).mean(),
                 (keep[1:] * keep[:-1]).mean(), (keep[1:, 1:] * keep[:-1, :-1]).mean()):  # fmt: skip
        assert abs(both.item() - q) < 6 * sigma_pair


def test_other_seeds_draw_unrelated_masks():
    a = mask(0.3, (1, 2)).keep(256, 512)
    for seed in ((1, 3), (2, 2), (2**32 - 1, 0)):
        b = mask(0.3, seed).keep(256, 512)
        agree = (a == b).double().mean().item()
        assert abs(agree - (0.7**2 + 0.3**2)) < 0.01  # independent: agree w.p. (1-p)^2 + p^2
    assert torch.equal(a, mask(0.3, (1, 2)).keep(256, 512))  # and the same seed, the same mask


def test_scale_is_the_exact_keep_probability_and_bad_inputs_are_refused():
    m = mask(0.1)
    assert m.threshold == round(0.1 * 2**16) and m.scale == 1 / (1 - m.threshold / 2**16)
    with pytest.raises(ValueError, match="dropout probability"):
        mask(1.0)
    with pytest.raises(ValueError, match="seed"):
        HashedDropout(torch.zeros(3, dtype=torch.int64), 0.1)


def test_draw_follows_torchs_generator():
    torch.manual_seed(3)
    a = HashedDropout.draw(0.1, "cpu").seed
    torch.manual_seed(3)
    assert torch.equal(a, HashedDropout.draw(0.1, "cpu").seed)
    assert not torch.equal(a, HashedDropout.draw(0.1, "cpu").seed)


# --- the kernels ----------------------------------------------------------------------------------
def kernel_masks(m, n_rows, n_cols, device, programs=None):
    """Each kernel's own mask times its scale, read out with one-hot operands: the forward's (x = 1 and A
    = 64 rows of the identity at a time), the backward's A gradient (g = I, x = 1) and input gradient
    (g = I, A = 1), and the masked input gradient's."""
    ones = torch.ones(n_rows, n_cols, device=device)
    eye = torch.eye(max(n_rows, n_cols), device=device)
    forward = torch.cat([kernels.dropout_project(ones, eye[c:c + 64, :n_cols].contiguous(), m.seed, m.threshold,
                                                 m.scale, programs=programs)[:, : min(64, n_cols - c)]
                         for c in range(0, n_cols, 64)], dim=1)  # fmt: skip
    g, a = eye[:n_rows, :n_rows].contiguous(), torch.ones(n_rows, n_cols, device=device)
    grad_x = torch.zeros(n_rows, n_cols, device=device)
    grad_a = kernels.dropout_backward(g, ones, m.seed, m.threshold, m.scale, grad_x=grad_x, a=a,
                                      input_scale=m.scale, programs=programs)  # fmt: skip
    masked = add_masked_lowrank_(torch.zeros(n_rows, n_cols, device=device), g, a, None, m.scale, seed=m.seed,
                                 threshold=m.threshold)  # fmt: skip
    return {"forward": forward, "A gradient": grad_a, "input gradient": grad_x, "masked add": masked}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("programs", [1, 40], ids=["one-split", "splits"])
def test_every_kernels_mask_is_the_twins_bit_for_bit(device, programs):
    """Over several tiles in both directions (columns past 256, so tiles start at later even columns)."""
    m = mask(0.3, device=device)
    n_rows, n_cols = 45, 517  # rank = rows for the backward's one-hot g: up to 64
    want = m.keep(n_rows, n_cols).to(torch.float32) * m.scale
    for name, got in kernel_masks(m, n_rows, n_cols, device, programs).items():
        assert torch.equal(got, want), name


@pytest.mark.parametrize("device", DEVICES)
def test_a_threshold_of_one_compiles_and_drops_little(device):
    """p = 1.5e-5 gives threshold 1: Triton must not turn that argument into a constant."""
    m = mask(1.5e-5, device=device)
    assert m.threshold == 1
    want = m.keep(45, 130).to(torch.float32) * m.scale
    for name, got in kernel_masks(m, 45, 130, device).items():
        assert torch.equal(got, want), name


def _inputs(n_rows, n_cols, rank, dtype, device, seed=0):
    x = randn((n_rows, n_cols + 5), dtype, seed=seed, device=device)[:, :n_cols]  # strided rows, like x_rows
    a = randn((rank, n_cols), dtype, seed=seed + 1, device=device, scale=0.5)
    g = randn((n_rows, rank), dtype, seed=seed + 2, device=device, scale=0.5)
    return x, a, g


# (70, 300, 72) takes >5 s under the interpreter
SHAPES = [(37, 203, 5), (130, 96, 64), pytest.param((70, 300, 72), marks=pytest.mark.slow), (9, 65, 16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("programs", [1, None, 64], ids=["one-split", "default", "many-splits"])
def test_products_match_float64(shape, dtype, device, programs):
    if device == "cuda" and dtype == torch.float64 and shape[2] > 64:
        pytest.skip("float64 (gradcheck's) takes ranks up to 64 on CUDA: its product lives in shared memory")
    m = mask(0.3, device=device)
    x, a, g = _inputs(*shape, dtype, device)
    dropped = x.double() * m.keep(*x.shape).double() * m.scale
    h = kernels.dropout_project(x, a, m.seed, m.threshold, m.scale, programs=programs)
    torch.testing.assert_close(h, (dropped @ a.double().t()).to(dtype), **TOLERANCE[dtype])
    grad = kernels.dropout_backward(g, x, m.seed, m.threshold, m.scale, torch.float64, programs=programs)
    torch.testing.assert_close(grad, g.double().t() @ dropped, **TOLERANCE[dtype])
    # with the input gradient on the same tiles: grad_x += 0.5 * keep * (g @ a)
    grad_x = randn(x.shape, dtype, seed=9, device=device)
    want_x = (grad_x.double() + 0.5 * m.keep(*x.shape).double() * (g.double() @ a.double())).to(dtype)
    grad = kernels.dropout_backward(g, x, m.seed, m.threshold, m.scale, torch.float64, grad_x, a, 0.5,
                                    programs=programs)  # fmt: skip
    torch.testing.assert_close(grad, g.double().t() @ dropped, **TOLERANCE[dtype])
    torch.testing.assert_close(grad_x, want_x, **TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_twins_match_the_kernels(device):
    m = mask(0.2, device=device)
    x, a, g = _inputs(40, 150, 8, torch.float32, device)
    want_x = torch.ones_like(x)
    want_h = ops.dropout_project(x, a, m, policy=TWINS)
    want_grad = ops.dropout_backward(g, x, m, grad_x=want_x, a=a, policy=TWINS)
    got_x = torch.ones_like(x)
    got_h = ops.dropout_project(x, a, m, policy=FORCED)
    got_grad = ops.dropout_backward(g, x, m, grad_x=got_x, a=a, policy=FORCED)
    torch.testing.assert_close(got_h, want_h, **TOLERANCE[torch.float32])
    torch.testing.assert_close(got_grad, want_grad, **TOLERANCE[torch.float32])
    torch.testing.assert_close(got_x, want_x, **TOLERANCE[torch.float32])
    assert got_grad.dtype == torch.float32 and not torch.equal(got_x, torch.ones_like(x))


@pytest.mark.parametrize("device", DEVICES)
def test_split_reduction_is_deterministic_and_leaves_the_counters_at_zero(device):
    m = mask(0.1, device=device)
    x, a, g = _inputs(200, 260, 16, torch.bfloat16, device)
    first = kernels.dropout_project(x, a, m.seed, m.threshold, m.scale, programs=40)
    grad = kernels.dropout_backward(g, x, m.seed, m.threshold, m.scale, programs=40)
    for _ in range(3):
        assert torch.equal(kernels.dropout_project(x, a, m.seed, m.threshold, m.scale, programs=40), first)
        assert torch.equal(kernels.dropout_backward(g, x, m.seed, m.threshold, m.scale, programs=40), grad)
    assert torch.count_nonzero(kernels._arrivals[x.device]) == 0  # keyed by the tensors' device (cuda:0)


@pytest.mark.parametrize("device", DEVICES)
def test_more_tiles_than_counters_run_unsplit_and_keep_the_buffer(device, monkeypatch):
    """The counter buffer is never replaced (a captured graph keeps its address): more tiles than
    counters run the reduction unsplit instead."""
    m = mask(0.1, device=device)
    x, a, g = _inputs(200, 260, 16, torch.float32, device)
    small = torch.zeros(2, dtype=torch.int32, device=device)
    monkeypatch.setitem(kernels._arrivals, x.device, small)
    got = kernels.dropout_project(x, a, m.seed, m.threshold, m.scale, programs=40)  # 4 row tiles > 2 counters
    dropped = x.double() * m.keep(*x.shape).double() * m.scale
    torch.testing.assert_close(got, (dropped @ a.double().t()).float(), **TOLERANCE[torch.float32])
    assert kernels._arrivals[x.device] is small and torch.count_nonzero(small) == 0


@pytest.mark.gpu
def test_a_capture_allocates_no_counters_and_replays_right(monkeypatch):
    """Inside a capture with no counters yet, the reduction runs unsplit (a zero-fill would only be
    recorded); warm-ups before a capture (`KernelPolicy.graph_step`) allocate them eagerly."""
    monkeypatch.setattr(kernels, "_arrivals", {})
    m = mask(0.1, device="cuda")
    x, a, g = _inputs(300, 1000, 16, torch.bfloat16, "cuda")
    want = kernels.dropout_project(x, a, m.seed, m.threshold, m.scale)
    kernels._arrivals.clear()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        got = kernels.dropout_project(x, a, m.seed, m.threshold, m.scale)
    assert kernels._arrivals == {}
    graph.replay()
    torch.testing.assert_close(got, want, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
def test_another_seed_changes_the_products(device):
    """Negative control: the comparisons above would see a kernel that ignored its seed."""
    x, a, g = _inputs(37, 203, 5, torch.float32, device)
    m1 = mask(0.3, (1, 2), device)
    h1 = kernels.dropout_project(x, a, m1.seed, m1.threshold, m1.scale)
    grad1 = kernels.dropout_backward(g, x, m1.seed, m1.threshold, m1.scale)
    for other in ((1, 3), (2, 2)):  # either word of the seed
        m2 = mask(0.3, other, device)
        assert not torch.allclose(h1, kernels.dropout_project(x, a, m2.seed, m2.threshold, m2.scale))
        assert not torch.allclose(grad1, kernels.dropout_backward(g, x, m2.seed, m2.threshold, m2.scale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_lowrank_with_the_hashed_mask(device, dtype):
    m = mask(0.3, device=device)
    out = randn((37, 203), dtype, seed=7, device=device)
    _, a, g = _inputs(37, 203, 5, dtype, device)
    keep = m.keep(37, 203)
    want = (out.double() + 0.75 * m.scale * keep.double() * (g.double() @ a.double())).to(dtype)
    got = add_masked_lowrank_(out.clone(), g, a, None, 0.75 * m.scale, seed=m.seed, threshold=m.threshold)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    twin = ops.add_masked_lowrank_(out.clone(), g, a, m, 0.75, policy=TWINS)  # the twin, given the HashedDropout
    torch.testing.assert_close(twin, want, **TOLERANCE[dtype])


def test_kernels_refuse_bad_inputs():
    m = mask()
    x = torch.randn(8, 16)
    with pytest.raises(ValueError, match="unit-stride"):
        kernels.dropout_project(x.t(), torch.randn(4, 8), m.seed, m.threshold, m.scale)
    with pytest.raises(ValueError, match="seed"):
        kernels.dropout_project(x, torch.randn(4, 16), m.seed.int(), m.threshold, m.scale)
    with pytest.raises(ValueError, match=r"\[r, 16\]"):
        kernels.dropout_project(x, torch.randn(4, 15), m.seed, m.threshold, m.scale)
    with pytest.raises(ValueError, match="g must be"):
        kernels.dropout_backward(torch.randn(7, 4), x, m.seed, m.threshold, m.scale)
    with pytest.raises(ValueError, match="grad_x must be"):
        kernels.dropout_backward(torch.randn(8, 4), x, m.seed, m.threshold, m.scale, grad_x=x.clone())


# --- the LoRA layer on the hashed path --------------------------------------------------------------
def _layer(device, dtype, policy=FORCED):
    from qlora.lora import LoRALinear, LoraSpec, QuantSpec

    torch.manual_seed(0)
    layer = LoRALinear(96, 80, quant=QuantSpec("nf4"), lora=LoraSpec(r=8, alpha=16, dropout=0.3), dtype=dtype,
                       device=device, policy=policy).train()  # fmt: skip
    layer.set_base_weight(torch.randn(80, 96, device=device) * 0.05)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)  # B = 0 would leave A's gradient zero
    return layer


@pytest.mark.parametrize("device", DEVICES)
def test_layer_gradients_match_autograd_with_the_same_hashed_mask(device):
    layer = _layer(device, torch.float32)
    x = randn((3, 11, 96), torch.float32, seed=1, device=device).requires_grad_(True)
    torch.manual_seed(123)
    layer(x).square().sum().backward()
    torch.manual_seed(123)
    m = HashedDropout.draw(0.3, device)  # the very seed the layer drew
    x_ref = x.detach().clone().requires_grad_(True)
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    dropped = x_ref * m.multipliers(33, 96, torch.float32).view(3, 11, 96)
    w = layer.dense_base_weight(torch.float32)
    y = x_ref @ w.t() + layer.scale * (dropped @ A.t()) @ B.t()
    y.square().sum().backward()
    for got, want in ((x.grad, x_ref.grad), (layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Negative control: the gradients see another mask
    layer.zero_grad()
    torch.manual_seed(7)
    layer(x.detach()).square().sum().backward()
    assert not torch.allclose(layer.lora_A.weight.grad, A.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", [FORCED, TWINS], ids=["kernels", "twins"])
def test_layer_saves_neither_a_mask_nor_a_dropped_copy(device, policy):
    """Backward keeps x and the seed, on the kernels and on the twins alike (one dropout, the hashed mask,
    everywhere): no bool tensor and no second [N, in] tensor is saved."""
    layer = _layer(device, torch.bfloat16, policy)
    x = randn((2, 9, 96), torch.bfloat16, seed=1, device=device).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    inputs_sized = [t for t in saved if t.numel() == x.numel()]
    assert len(inputs_sized) == 1 and inputs_sized[0].data_ptr() == x.data_ptr()  # x itself, not a copy
    assert not any(t.dtype == torch.bool for t in saved)
    saved.clear()  # negative control: torch's dropout kernel saves its bool mask, and the hook sees it
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.native_dropout(x, 0.3, True)
    assert any(t.dtype == torch.bool for t in saved)


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_recompute_draws_the_same_hashed_mask(device):
    """Through a gradient checkpoint (the recompute restores the generator, so it draws the same seed) the
    gradients equal those of the plain forward and backward, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    layer = _layer(device, torch.float32)
    x = randn((2, 9, 96), torch.float32, seed=1, device=device).requires_grad_(True)
    grads = []
    for checkpointed in (False, True):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        y = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        y.square().sum().backward()
        grads.append((x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()))
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.equal(plain, recomputed)


@pytest.mark.parametrize("device", DEVICES)
def test_a_recompute_that_draws_no_mask_is_refused(device):
    """The seed is a saved tensor: a recompute that drew no mask (here: the layer switched to eval mode
    between the forward and the backward) fails loudly instead of mixing two masks into A's gradient."""
    from torch.utils.checkpoint import checkpoint

    layer = _layer(device, torch.float32)
    x = randn((2, 9, 96), torch.float32, seed=1, device=device)  # no input gradient: the quiet case
    y = checkpoint(layer, x, use_reentrant=False)
    layer.eval()
    with pytest.raises(Exception, match="(?i)recomput|checkpoint|saved"):
        y.square().sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_a_recompute_under_another_policy_draws_the_same_mask(device):
    """One dropout: a checkpoint whose recompute runs the twins (the kernels forced for the forward only)
    applies the same mask, so A's gradient equals the all-kernel one to float32 rounding."""
    from torch.utils.checkpoint import checkpoint

    layer = _layer(device, torch.float32)
    x = randn((2, 9, 96), torch.float32, seed=1, device=device)
    grads = []
    for recompute_policy, seed in ((FORCED, 5), (TWINS, 5), (FORCED, 6)):
        layer.zero_grad()
        layer.policy = FORCED
        torch.manual_seed(seed)
        y = checkpoint(layer, x, use_reentrant=False)
        layer.policy = recompute_policy
        y.square().sum().backward()
        grads.append(layer.lora_A.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], **TOLERANCE[torch.float32])
    assert not torch.allclose(grads[2], grads[0], rtol=1e-3, atol=1e-3)  # negative control: another seed
