"""Paged optimizers on CUDA: same numbers as unpaged / torch, state in pinned host memory, lower peak GPU memory."""

from __future__ import annotations

import io

import pytest
import torch
from optim_fixtures import make_mlp, make_scheduler, train

from qlora.optim import build_optimizer

pytestmark = pytest.mark.gpu
CUDA = "cuda"
RESIDENT = {"page_min_numel": 1 << 62}  # nothing is paged: every state stays on the GPU
ALWAYS = {"page_policy": "always"}  # page every large state, whatever room the GPU has


def deep_model(seed: int = 0) -> torch.nn.Sequential:
    """Five paged-size layers of different sizes (so the two staging slots alternate and get re-carved)."""
    torch.manual_seed(seed)
    sizes = [300, 700, 1100, 400, 900, 350]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers).to(CUDA)


def run_deep(name: str, steps: int = 10, **options) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = deep_model()
    opt = build_optimizer(name, model.parameters(), lr=1e-2, weight_decay=0.1, **options)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(32, 300, generator=g).to(CUDA)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def test_paged_32bit_equals_torch_adamw_on_cuda():
    ref_model = make_mlp(seed=0).to(CUDA)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    ref = train(ref_model, ref_opt, make_scheduler(ref_opt), 0, 50, device=CUDA)
    model = make_mlp(seed=0).to(CUDA)
    opt = build_optimizer("paged_adamw_32bit", model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                          **ALWAYS)
    ours = train(model, opt, make_scheduler(opt), 0, 50, device=CUDA)
    assert opt.state[model[4].weight]["exp_avg"].is_pinned()  # fc2 (129,000) was paged
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        for pa, pb in zip(a["params"], b["params"], strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=f"step {step}")


@pytest.mark.parametrize("name", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_paging_changes_no_bit(name):
    """The same kernels run on staged copies: paged and GPU-resident states give identical results."""
    paged_model, paged_opt = run_deep(name, **ALWAYS)
    resident_model, resident_opt = run_deep(name, **RESIDENT)
    for p, q in zip(paged_model.parameters(), resident_model.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in resident_opt.state[q].items():
            assert torch.equal(paged_opt.state[p][key].cpu(), value.cpu()), key
    report = paged_opt.memory_report()
    assert report["pinned_host_bytes"] > 0 and report["gpu_staging_bytes"] > 0
    assert resident_opt.memory_report()["pinned_host_bytes"] == 0


def test_state_lives_in_pinned_host_memory_and_resumes_there():
    model, opt = run_deep("paged_adamw_32bit", steps=2, **ALWAYS)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            t = opt.state[p][key]
            if p.numel() >= 100_000:
                assert t.device.type == "cpu" and t.is_pinned(), key
            else:
                assert t.is_cuda, key  # biases stay on the GPU (bitsandbytes' rule)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = build_optimizer("paged_adamw_32bit", model.parameters(), lr=1e-2, weight_decay=0.1, **ALWAYS)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for p in model.parameters():
        t = fresh.state[p]["exp_avg"]
        assert (t.is_pinned() if p.numel() >= 100_000 else t.is_cuda)
        assert torch.equal(t.cpu(), opt.state[p]["exp_avg"].cpu())


def peak_step_memory(paged: bool) -> tuple[int, int, int]:
    """(peak bytes allocated during the 3rd step, state bytes, staging bytes) for 8 layers of 1024 x 1024."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(8)]).to(CUDA)
    opt = build_optimizer("paged_adamw_32bit", model.parameters(), lr=1e-3, **(ALWAYS if paged else RESIDENT))
    x = torch.randn(4, 1024, device=CUDA)
    for _ in range(3):
        model(x).square().mean().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated()
    state_bytes = sum(8 * p.numel() for p in model.parameters())
    return peak, state_bytes, opt.memory_report()["gpu_staging_bytes"]


def test_paging_lowers_peak_gpu_memory():
    paged_peak, state_bytes, staging = peak_step_memory(paged=True)
    resident_peak, _, _ = peak_step_memory(paged=False)
    saving = resident_peak - paged_peak
    # expected saving: the 64 MiB of state minus the two 8 MiB staging slots = 48 MiB; 1 MiB for allocator rounding
    assert staging == 2 * 8 * 1024 * 1024
    assert saving >= state_bytes - staging - (1 << 20), (saving, state_bytes, staging)


def test_auto_policy_keeps_states_resident_when_there_is_room():
    """Default "auto": a small model on an idle GPU keeps its states on the GPU, with the same numbers as paged."""
    auto_model, auto_opt = run_deep("paged_adamw_32bit")
    paged_model, paged_opt = run_deep("paged_adamw_32bit", **ALWAYS)
    assert auto_opt.memory_report()["pinned_host_bytes"] == 0
    assert paged_opt.memory_report()["pinned_host_bytes"] > 0
    for p, q in zip(auto_model.parameters(), paged_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # multi-tensor vs one-tensor update


def test_auto_policy_pages_under_a_memory_cap():
    """With the process capped just above what the run itself reserves, "auto" pages (and the run completes)."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        # limit = cap, margin = max(1 GiB, cap / 10) = 1 GiB: reserved + states (~17 MiB) + margin > cap
        cap = torch.cuda.memory_reserved() + (1 << 30) + (8 << 20)
        torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0))
        model, opt = run_deep("paged_adamw_32bit", steps=3)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert opt.memory_report()["pinned_host_bytes"] > 0
