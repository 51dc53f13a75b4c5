"""Sampling: exact draws from softmax(logits / T) (Gumbel-max over hashed noise), top-k and top-p keep the right
tokens, the repetition penalty is transformers', greedy takes the lowest id among ties, and a row's draw
depends on its own seed and step only."""

import pytest
import torch

from qlora.generation.sampling import BatchSampling, SamplingParams, next_tokens


def _batch(rows: int, vocab: int, **params) -> BatchSampling:
    s = BatchSampling.empty(rows, vocab, torch.device("cpu"))
    for row in range(rows):
        s.assign(row, SamplingParams(**{**params, "seed": params.get("seed", 0) + row}), [])
    return s


def test_draws_follow_softmax_of_logits_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    temperature, rows, steps = 0.7, 64, 100
    s = _batch(rows, 5, temperature=temperature)
    counts = torch.zeros(5)
    for step in range(steps):
        tokens = next_tokens(logits.expand(rows, 5), s, torch.full((rows,), step))
        counts += torch.bincount(tokens, minlength=5)
    n = rows * steps
    expected = torch.softmax(logits / temperature, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (counts, expected)  # 4 degrees of freedom: p = 0.0004


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([3.0, 2.5, 2.0, 0.0, -1.0, -2.0])
    probs = torch.softmax(logits, -1)
    rows = 32
    for params, allowed in (({"top_k": 2}, {0, 1}), ({"top_p": float(probs[0] + probs[1]) - 1e-4}, {0, 1}),
                            ({"top_p": float(probs[0]) + 1e-4}, {0, 1}), ({"top_p": 0.05}, {0})):  # fmt: skip
        s = _batch(rows, 6, temperature=1.0, **params)
        seen = set()
        for step in range(40):
            seen |= set(next_tokens(logits.expand(rows, 6), s, torch.full((rows,), step)).tolist())
        assert seen == allowed, (params, seen)


def test_repetition_penalty_is_transformers():
    transformers = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen) * 3
    top = logits.argmax(-1).tolist()
    prompts = [[1, 2, top[0]], [4, top[1], 40], [7]]  # the third row's best token is not in its prompt
    s = BatchSampling.empty(3, 50, torch.device("cpu"))
    for row, ids in enumerate(prompts):
        s.assign(row, SamplingParams(repetition_penalty=1.7), ids)
    ours = next_tokens(logits, s, torch.zeros(3, dtype=torch.int64))
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty=1.7)
    theirs = [int(processor(torch.tensor([ids]), logits[row : row + 1].clone()).argmax()) for row, ids in
              enumerate(prompts)]  # fmt: skip
    assert ours.tolist() == theirs
    assert ours.tolist() != logits.argmax(-1).tolist()  # the penalty changed something (negative control)


def test_greedy_takes_the_lowest_id_among_ties_on_either_path():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0], [7.0, 7.0, 7.0, 7.0]])
    s = _batch(2, 4)
    step = torch.zeros(2, dtype=torch.int64)
    assert next_tokens(logits, s, step, sample=False).tolist() == [1, 0]
    assert next_tokens(logits, s, step, sample=True).tolist() == [1, 0]  # greedy rows inside a sampling batch


def test_a_rows_draw_depends_on_its_seed_and_step_only():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1))
    alone = _batch(1, 1000, temperature=1.0, seed=5)
    crowd = BatchSampling.empty(4, 1000, torch.device("cpu"))
    for row, seed in enumerate((9, 5, 11, 5)):
        crowd.assign(row, SamplingParams(temperature=1.0 if row != 2 else 0.0, seed=seed), [])
    for step in range(20):
        mine = next_tokens(logits, alone, torch.tensor([step]))
        theirs = next_tokens(logits.expand(4, 1000), crowd, torch.full((4,), step))
        assert theirs[1] == mine[0] and theirs[3] == mine[0]
    draws = {int(next_tokens(logits, _batch(1, 1000, temperature=1.0, seed=seed), torch.tensor([0]))[0])
             for seed in range(30)}  # fmt: skip
    assert len(draws) > 5  # different seeds draw differently


def test_bad_parameters_name_the_field():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        SamplingParams(max_new_tokens=0)
