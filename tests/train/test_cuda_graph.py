"""CUDA-graph steps: the static-shape loss equals the eager one (CPU); replays equal eager steps (GPU)."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import VOCAB, tiny_qlora_model

from qlora.data.collate import collate
from qlora.data.encode import EncodedExample
from qlora.ops import KernelPolicy, apply_policy, policy_of
from qlora.optim import build_optimizer
from qlora.optim.in_backward import StepInBackward, backward_order_groups
from qlora.train import cuda_graph
from qlora.train.cuda_graph import CudaGraphStep, is_right_padded, pad_batch
from qlora.train.loss import loss_sum, loss_sum_all_rows


def right_padded_batch(seed=0) -> dict[str, torch.Tensor]:
    """Three examples of different lengths, prompts masked (-100), right-padded by `collate`."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n_prompt, n_answer in [(5, 4), (3, 9), (7, 2)]:
        ids = torch.randint(1, VOCAB, (n_prompt + n_answer,), generator=g).tolist()
        examples.append(EncodedExample(input_ids=ids, labels=[-100] * n_prompt + ids[n_prompt:]))
    return collate(examples, pad_id=0)


def test_all_rows_loss_equals_the_eager_loss_and_gradients():
    model, params = tiny_qlora_model("cpu")
    batch = right_padded_batch()
    assert not bool(batch["attention_mask"].all())  # the batch really is padded
    want, n = loss_sum(model, batch)
    want.backward()
    want_grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    got = loss_sum_all_rows(model, batch["input_ids"], batch["labels"], chunk_rows=7)
    got.backward()
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for p, g in zip(params, want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_pad_batch_rounds_the_length_up_with_ignored_labels():
    batch = right_padded_batch()
    length = batch["input_ids"].shape[1]
    padded = pad_batch(batch, 8, pad_id=0)
    assert padded["input_ids"].shape[1] == -(-length // 8) * 8
    assert torch.equal(padded["input_ids"][:, :length], batch["input_ids"])
    assert (padded["labels"][:, length:] == -100).all() and (padded["attention_mask"][:, length:] == 0).all()
    assert is_right_padded(padded["attention_mask"])
    assert pad_batch(padded, 8, pad_id=0) is padded
    assert not is_right_padded(torch.tensor([[0, 1, 1]]))  # left padding


def test_graph_step_refuses_cpu_parameters():
    model, params = tiny_qlora_model("cpu")
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphStep(model, params)


# --- on the GPU -------------------------------------------------------------------------------------


def _grads(params):
    return [p.grad.clone() for p in params]


def _eager(model, params, batch, scale):
    total = loss_sum_all_rows(model, batch["input_ids"], batch["labels"])
    (total * scale).backward()
    return total.detach()


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["auto", "triton"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_replay_equals_the_eager_step(dropout, kernels):
    """Same seed, same dropout masks (also in the checkpoint recompute), same loss and gradients, whether the
    call captures first or only replays. The dropout is the hashed mask in eager and captured steps alike,
    with the model's default policy ("auto": the graph-step-only kernels run in the graph, their twins
    eagerly) as with the kernels forced."""
    model, params = tiny_qlora_model("cuda", torch.bfloat16, dropout=dropout)
    apply_policy(model, KernelPolicy(kernels=kernels))
    batch = {k: v.cuda() for k, v in right_padded_batch().items()}
    step = CudaGraphStep(model, params)
    assert step.policy is policy_of(model)
    torch.cuda.manual_seed(123)
    want = _eager(model, params, batch, 0.5)
    want_grads = _grads(params)
    step.zero_grad()
    torch.cuda.manual_seed(123)
    got = step.forward_backward(batch, 0.5)  # captures (its warm-up draws are rewound), then replays once
    assert step.captures == 1
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for p, g in zip(params, want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=2e-2, atol=1e-3)
    step.zero_grad()
    torch.cuda.manual_seed(123)
    again = step.forward_backward(batch, 0.5)  # a plain replay
    torch.testing.assert_close(again, want, rtol=1e-3, atol=1e-3)
    for p, g in zip(params, want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=2e-2, atol=1e-3)
    if dropout:  # negative control: another seed draws other masks, and the gradients show it
        step.zero_grad()
        torch.cuda.manual_seed(321)
        step.forward_backward(batch, 0.5)
        assert max((p.grad - g).abs().max().item() for p, g in zip(params, want_grads, strict=True)) > 1e-2


@pytest.mark.gpu
def test_replays_with_the_update_in_backward_follow_eager_training():
    """The optimizer inside the graph (StepInBackward, every state paged through its slots): four replays equal
    four eager steps with the optimizer stepping after backward, and no gradient outlives a replay."""
    batch = {k: v.cuda() for k, v in right_padded_batch().items()}
    ref, ref_params = tiny_qlora_model("cuda", torch.bfloat16)
    model, params = tiny_qlora_model("cuda", torch.bfloat16)
    ref_opt = build_optimizer("paged_adamw_32bit", ref_params, lr=1e-2, weight_decay=0.1, page_min_numel=1 << 62)
    opt = build_optimizer("paged_adamw_32bit", params, lr=1e-2, weight_decay=0.1, page_policy="always",
                          page_min_numel=1)  # fmt: skip
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (ref_opt, opt)]
    stepper = StepInBackward(opt, backward_order_groups(model))
    assert len(stepper.groups) == 2 and stepper.slots  # two decoder layers, paged
    step = CudaGraphStep(model, params, stepper=stepper)
    for i in range(4):  # a new learning rate each step: the captured update reads it from its coefficient rows
        want = _eager(ref, ref_params, batch, 0.25)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        got = step.forward_backward(batch, 0.25)
        for schedule in schedules:
            schedule.step()
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3, msg=f"loss of step {i}")
        assert all(p.grad is None for p in params)
    assert step.captures == 1
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)
    start = tiny_qlora_model("cuda", torch.bfloat16)[1]
    moved = max((p.float() - q.float()).abs().max().item() for p, q in zip(params, start, strict=True))
    assert moved > 1e-2  # negative control: four steps moved the adapters well beyond the tolerance


@pytest.mark.gpu
def test_replays_accumulate_and_survive_set_to_none_and_new_shapes():
    model, params = tiny_qlora_model("cuda", torch.bfloat16)
    a = {k: v.cuda() for k, v in right_padded_batch(0).items()}
    b = {k: v.cuda() for k, v in pad_batch(right_padded_batch(1), 16, pad_id=0).items()}
    step = CudaGraphStep(model, params)
    optimizer = torch.optim.SGD(params, lr=0.0)
    want_a, want_b = _eager(model, params, a, 1.0), None
    grads_a = _grads(params)
    optimizer.zero_grad(set_to_none=True)
    want_b = _eager(model, params, b, 1.0)
    grads_b = _grads(params)
    optimizer.zero_grad(set_to_none=True)  # the graph step must re-attach its buffers
    got_a = step.forward_backward(a, 1.0)
    got_b = step.forward_backward(b, 1.0)  # a second shape: a second graph in the same pool
    assert step.captures == 2 and len(step.graphs) == 2
    torch.testing.assert_close(got_a, want_a, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got_b, want_b, rtol=1e-3, atol=1e-3)
    for p, ga, gb in zip(params, grads_a, grads_b, strict=True):
        torch.testing.assert_close(p.grad, ga + gb, rtol=2e-2, atol=1e-3)
    step.zero_grad()
    assert all(not p.grad.any() for p in params)
    params[0].grad = torch.zeros_like(params[0])
    with pytest.raises(RuntimeError, match="replaced by another tensor"):
        step.forward_backward(a, 1.0)


@pytest.mark.gpu
def test_training_with_graphs_follows_eager_training(tmp_path):
    """`train()` on CUDA with cuda_graphs (the default) and without: the same losses, step for step."""
    from train_fixtures import ALPACA, STORIES, tiny_config

    from qlora.train.loop import train
    from qlora.train.metrics import read_metrics

    if not (STORIES.exists() and ALPACA.exists()):
        pytest.skip(f"needs {STORIES} and {ALPACA}")
    losses = {}
    for graphs in (False, True):
        cfg = tiny_config(tmp_path / str(graphs), max_steps=6, cuda_graphs=graphs)
        # no dropout: this compares the two steps' losses; test_replay_equals_the_eager_step compares the masks
        cfg.device, cfg.lora.dropout = "cuda", 0.0
        train(cfg, progress=False)
        records = read_metrics(tmp_path / str(graphs) / "metrics.jsonl")
        losses[graphs] = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses[True]) == 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


@pytest.mark.gpu
def test_warmups_and_capture_run_inside_the_policys_graph_step():
    """The forwards before a capture and the captured one take the graph's paths (`KernelPolicy.graph_step`,
    so the graph-step kernels compile outside the capture); an eager step after it does not."""
    model, params = tiny_qlora_model("cuda", torch.bfloat16)
    policy = policy_of(model)
    seen = []
    # the final norm runs once per forward (`loss_sum_all_rows` calls `hidden_states`, not the model's forward)
    model.model.norm.register_forward_pre_hook(lambda module, args: seen.append(policy.in_graph_step()))
    step = CudaGraphStep(model, params)
    batch = {k: v.cuda() for k, v in right_padded_batch().items()}
    step.forward_backward(batch, 1.0)
    assert seen == [True] * (cuda_graph.WARMUP_RUNS + 1) and not policy.in_graph_step()
    step.forward_backward(batch, 1.0)  # a replay runs no Python
    _eager(model, params, batch, 1.0)
    assert seen == [True] * (cuda_graph.WARMUP_RUNS + 1) + [False]


@pytest.mark.gpu
def test_a_failed_capture_raises_and_leaves_no_graph(monkeypatch):
    """No eager fallback: the error reaches the caller, no graph is kept for the shape, the gradient buffers
    are the step's own with what they held, and the policy has left its graph step."""
    model, params = tiny_qlora_model("cuda", torch.bfloat16)
    step = CudaGraphStep(model, params)
    before = _grads(params)

    def failing_graph(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing (injected by the test)")

    monkeypatch.setattr(cuda_graph.torch.cuda, "graph", failing_graph)
    batch = {k: v.cuda() for k, v in right_padded_batch().items()}
    with pytest.raises(RuntimeError, match="injected"):
        step.forward_backward(batch, 1.0)
    assert step.graphs == {} and step.captures == 0 and not step.policy.in_graph_step()
    for p, g, b in zip(params, step._grads, before, strict=True):
        assert p.grad is g and torch.equal(g, b)  # the warm-ups' gradient was taken back out
