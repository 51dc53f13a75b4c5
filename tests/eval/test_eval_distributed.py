"""`qlora eval` on many processes: torchrun splits the perplexity's windows and MMLU's questions over the ranks,
and the report equals the one-process report.

The split itself is checked in-process: every item goes to exactly one rank and comes back to its place, and a
rank run without the others (a `Runtime` of rank r of 2 with no process group, so nothing is summed) scores its
share only, so the shares are proper parts that add up to the whole (a rank that scored everything would fail).
Then the product as users run it: `torchrun --nproc-per-node=2 -m qlora eval` on gloo, against one plain process.
Perplexity runs stories260K on a short story; MMLU needs a tokenizer with single-token letters A-D (stories260K's
512 pieces split "A" as "▁" "A"), so it runs SmolLM2-135M on 20 questions of the MMLU CSVs, 4 to a batch.
Tolerance: perplexity rel 1e-6 (the windows' NLLs return in window order and are summed as one process sums them,
so the numbers are in fact bit-identical; seen: equal); MMLU's counts are compared exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from qlora.distributed import Runtime
from qlora.eval.mmlu import evaluate_mmlu
from qlora.eval.mmlu_data import LETTERS, MMLUExample
from qlora.eval.perplexity import perplexity, window_spans
from qlora.eval.shares import in_global_order, placed, share_of

REPO = Path(__file__).resolve().parents[2]

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her red "
    "ball. One day, she saw a big dog under a tree. The dog was sad because it had lost its bone. Lily wanted to "
    "help. She looked near the pond and behind the slide. At last she found the bone in the sand. The dog wagged "
    'its tail and licked her hand. Lily smiled and said, "Now we can be friends!" They played together until the '
    "sun went down, and then Lily went home to tell her mom about her new friend. "
)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def fake_rank(rank: int, world_size: int) -> Runtime:
    """Rank `rank` of `world_size` without a process group: it takes its share, and its collectives sum nothing."""
    return Runtime(rank=rank, world_size=world_size)


# --- the split ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "world_size"), [(29, 2), (30, 2), (7, 3), (2, 4), (1, 1), (0, 2)])
def test_every_item_goes_to_one_rank_and_comes_back_to_its_place(count, world_size):
    items = [float(10 + i) for i in range(count)]
    shares = [share_of(items, fake_rank(r, world_size)) for r in range(world_size)]
    assert sorted(x for share in shares for x in share) == items  # each exactly once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    summed = [sum(col) for col in zip(*(placed(s, count, r, world_size) for r, s in enumerate(shares)), strict=True)]
    assert summed == items  # what the all_reduce (sum) gives every rank: the one-process order
    assert in_global_order(items, count, Runtime()) == items  # a world of one: as it was


def test_a_share_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="rank 1 of 2: 3 values for its share of 2 of 5 items"):
        placed([1.0, 2.0, 3.0], 5, 1, 2)


def test_perplexity_of_a_rank_alone_is_its_share_of_the_windows(stories260k_dir):
    import qlora
    from qlora.tokenizer import Tokenizer

    model = qlora.load_model(stories260k_dir, quant_type=None, compute_dtype=torch.float32, device="cpu")
    tokenizer = Tokenizer.from_pretrained(stories260k_dir)
    ids = [tokenizer.bos_id, *tokenizer.encode(STORY * 2)]
    assert len(window_spans(len(ids), 64, 25)) % 2 == 1  # an odd count: the ranks' shares differ in size
    whole = perplexity(model, ids, max_length=64, stride=25)
    parts = [perplexity(model, ids, max_length=64, stride=25, runtime=fake_rank(r, 2)) for r in range(2)]
    assert all(0 < p.nll < whole.nll for p in parts)  # each rank scored some windows, not all of them
    assert parts[0].nll + parts[1].nll == pytest.approx(whole.nll, rel=1e-12)  # and together all of them
    assert all((p.tokens, p.windows) == (whole.tokens, whole.windows) for p in parts)


class CharTokenizer:
    """One id per character (enough for the scorer: "A".."D" are distinct single tokens)."""

    bos_id, eos_id, pad_id, source = 1, 2, 0, "CharTokenizer"

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class LastLetterEcho(nn.Module):
    """Logits [B, T, 128]: each position predicts its own token, so a prompt ending in "C" answers C."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the scorer a device

    def forward(self, ids, attention_mask):
        return 10.0 * nn.functional.one_hot(ids, 128).float()


def test_mmlu_of_a_rank_alone_scores_its_share_of_the_questions():
    examples = [MMLUExample(subject, f"{subject} question {i}?{LETTERS[i % 4]}", answer=(i * 7) % 4)
                for subject in ("algebra", "botany") for i in range(5)]  # fmt: skip
    model, tokenizer = LastLetterEcho(), CharTokenizer()
    whole = evaluate_mmlu(model, tokenizer, examples, batch_size=3)
    assert whole.predictions == [i % 4 for i in range(5)] * 2  # the echo model reads each prompt's last letter
    for rank in range(2):
        part = evaluate_mmlu(model, tokenizer, examples, batch_size=3, runtime=fake_rank(rank, 2))
        expected = [p if i % 2 == rank else 0 for i, p in enumerate(whole.predictions)]  # others' places: 0 = A
        assert part.predictions == expected


# --- torchrun -------------------------------------------------------------------------------------------------


def launch(processes: int, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """`python -m qlora eval ...` on torchrun with `processes` workers (one thread each), or one plain process (0)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if processes == 0:
        cmd = [sys.executable, "-m", "qlora", "eval", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "--max-restarts=0", "-m", "qlora", "eval", *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def one_and_two_processes(tmp_path: Path, *args: str) -> tuple[dict, dict, str]:
    """(one process's JSON report, two processes' report, two processes' stdout)."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    launch(0, *args, "--output", str(one))
    done = launch(2, *args, "--output", str(two))
    assert done.stdout.count(f"wrote {two}") == 1, done.stdout  # rank 0 alone prints and writes
    return json.loads(one.read_text()), json.loads(two.read_text()), done.stdout


@pytest.mark.slow
def test_perplexity_on_two_processes_equals_one(stories260k_dir, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text(STORY * 3, encoding="utf-8")
    args = ["--model", str(stories260k_dir), "--quant-type", "nf4", "--dtype", "float32", "--perplexity", str(text),
            "--max-length", "64", "--stride", "25"]  # fmt: skip
    one, two, stdout = one_and_two_processes(tmp_path, *args)
    assert one["perplexity_detail"]["windows"] % 2 == 1 and one["perplexity_detail"]["windows"] > 10
    for key in ("tokens", "windows", "max_length", "stride"):
        assert two["perplexity_detail"][key] == one["perplexity_detail"][key], key
    assert two["perplexity_detail"]["nll"] == pytest.approx(one["perplexity_detail"]["nll"], rel=1e-6)
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)
    assert stdout.count("perplexity ") == 1, stdout


@pytest.mark.slow
def test_mmlu_on_two_processes_equals_one(smollm2_gguf, shared_dir, tmp_path):
    args = ["--model", str(smollm2_gguf), "--quant-type", "none", "--dtype", "float32", "--mmlu",
            str(shared_dir / "data/mmlu/cais-mmlu-csv"), "--shots", "0", "--subjects", "anatomy", "astronomy",
            "marketing", "virology", "--limit", "5", "--batch-size", "4"]  # fmt: skip
    one, two, stdout = one_and_two_processes(tmp_path, *args)
    m1, m2 = one["mmlu"], two["mmlu"]
    assert m2["questions"] == m1["questions"] == 20
    correct = {s: round(a * 5) for s, a in m1["per_subject"].items()}
    assert {s: round(a * 5) for s, a in m2["per_subject"].items()} == correct
    assert len(set(correct.values())) > 1, correct  # subjects differ: a mix-up between them would show
    assert (m2["accuracy"], m2["micro_accuracy"]) == (m1["accuracy"], m1["micro_accuracy"])
    assert stdout.count("mmlu accuracy") == 1, stdout
