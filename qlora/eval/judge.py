"""Pairwise judging of two models' answers, in both orders, by an HTTP endpoint or a local model.

The paper's automated evaluation asks GPT-4 which of two answers to a question is better, with a
three-way verdict (assistant 1, assistant 2, tie), and observes a strong position bias: the judge
favours whichever answer it reads first. So every pair is judged twice, once in each order, and
both judgments count as games (`judge_pair`); a judge that always picks the first answer then
gives each model one win per question, i.e. a draw overall, and biases nothing.

A judge is any callable `(question, answer_1, answer_2) -> (verdict, raw_text)` with verdict 1, 2
or 3 (tie):

- `OpenAIJudge`: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server,
  ...), through urllib (no client library). The reply's last line is the verdict, as in the QLoRA
  repository's three-class review script (`parse_three_class_score`); FastChat's "[[A]]" / "[[B]]" /
  "[[C]]" is accepted too. An unreadable verdict counts as a tie and is marked `parsed: false`.
- `LocalModelJudge`: a model of ours reads the same prompt (through its chat template) and the
  verdict is the highest next-token logit among "1", "2", "3" at the answer position: the MMLU
  scorer's rule (`scoring`), deterministic and immune to a small model's rambling. Where the digits'
  encodings share a first token (sentencepiece "▁"), that token is appended to the prompt and the
  digits are compared at the next position (`scoring.divergent_candidates`).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from itertools import combinations

from qlora.eval.benchmarks import Answer, BenchmarkFileError
from qlora.eval.scoring import divergent_candidates, encode_prompts, last_position_logits
from qlora.generate import render_prompt
from qlora.tokenizer import Tokenizer

JUDGE_SYSTEM = "You are a careful and impartial judge of the quality of answers given by AI assistants."
JUDGE_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n[The End of Assistant 2's Answer]\n\n"
    "[System]\nCompare the two answers to the question above for helpfulness, relevance, accuracy and level "
    "of detail. Do not let the order in which they are shown, or their length, sway you. Explain your reasoning "
    "briefly, then write on a last line of its own only the number 1 if Assistant 1's answer is better, 2 if "
    "Assistant 2's answer is better, or 3 if they are equally good.\n"
)
TIE = 3


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or answered out of protocol."""


def judge_prompt(question: str, answer_1: str, answer_2: str) -> str:
    return JUDGE_TEMPLATE.format(question=question, answer_1=answer_1, answer_2=answer_2)


def parse_verdict(text: str) -> int | None:
    """1, 2 or 3 from the reply's last non-empty line (or FastChat's [[A]]/[[B]]/[[C]]); None if absent."""
    bracket = re.findall(r"\[\[([ABC])\]\]", text)
    if bracket:
        return "ABC".index(bracket[-1]) + 1
    lines = [line.strip().strip("*").strip() for line in text.strip().splitlines() if line.strip()]
    if lines and lines[-1] in ("1", "2", "3"):
        return int(lines[-1])
    return None


class OpenAIJudge:
    """POST {base_url}/chat/completions with a system and a user message; the verdict is parsed."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        timeout: float = 120.0,
        retries: int = 3,
        retry_wait: float = 2.0,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.temperature, self.max_tokens, self.timeout = temperature, max_tokens, timeout
        self.retries, self.retry_wait = retries, retry_wait

    def complete(self, system: str, user: str) -> str:
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }).encode()  # fmt: skip
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read().decode("utf-8"))
                return reply["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read().decode('utf-8', 'replace')[:200]}"
                if e.code < 500 and e.code != 429:
                    break  # a client error does not heal by retrying
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {e}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                raise JudgeError(f"{self.url}: reply is not a chat completion ({type(e).__name__}: {e})") from None
            if attempt + 1 < self.retries:
                time.sleep(self.retry_wait * (attempt + 1))
        raise JudgeError(f"{self.url}: judge request failed after {attempt + 1} attempt(s): {last}")

    def __call__(self, question: str, answer_1: str, answer_2: str) -> tuple[int | None, str]:
        text = self.complete(JUDGE_SYSTEM, judge_prompt(question, answer_1, answer_2))
        return parse_verdict(text), text


class LocalModelJudge:
    """A local model as judge: argmax of the "1"/"2"/"3" logits after the judge prompt."""

    def __init__(self, model, tokenizer: Tokenizer, *, max_length: int = 4096):
        self.model, self.tokenizer = model, tokenizer
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = min(max_length, context) if context else max_length  # longer: keep the end
        self.prefix_ids, self.verdict_ids = divergent_candidates(tokenizer, ("1", "2", "3"))

    def prompt(self, question: str, answer_1: str, answer_2: str) -> str:
        user = JUDGE_SYSTEM + "\n\n" + judge_prompt(question, answer_1, answer_2)
        text = render_prompt(self.tokenizer, user)
        return text + "Verdict (1, 2 or 3): " if self.tokenizer.chat_template is None else text

    def __call__(self, question: str, answer_1: str, answer_2: str) -> tuple[int | None, str]:
        prompt = self.prompt(question, answer_1, answer_2)
        ids = [encode_prompts(self.tokenizer, [prompt], add_bos=self.tokenizer.add_bos)[0] + self.prefix_ids]
        logits = last_position_logits(self.model, ids, self.verdict_ids, batch_size=1, max_length=self.max_length)[0]
        return int(logits.argmax()) + 1, "logits 1/2/3: " + ", ".join(f"{v:.3f}" for v in logits.tolist())


def judge_pair(judge, a: Answer, b: Answer) -> list[dict]:
    """Two games for one question: (a first, b second) and (b first, a second)."""
    if a.question_id != b.question_id:
        raise ValueError(f"answers to different questions: {a.question_id!r} and {b.question_id!r}")
    games = []
    for first, second in ((a, b), (b, a)):
        verdict, raw = judge(first.question, first.text, second.text)
        winner = {1: first.model_id, 2: second.model_id}.get(verdict, "tie")
        games.append({"question_id": a.question_id, "model_a": first.model_id, "model_b": second.model_id,
                      "shown_first": first.model_id, "verdict": verdict if verdict is not None else TIE,
                      "parsed": verdict is not None, "winner": winner, "judge_output": raw})  # fmt: skip
    return games


def judge_all_pairs(judge, answer_sets: list[list[Answer]]) -> list[dict]:
    """Every pair of models, every shared question, both orders. The sets must answer the same questions."""
    if len(answer_sets) < 2:
        raise BenchmarkFileError("judging needs the answers of at least two models")
    names = [s[0].model_id if s else "?" for s in answer_sets]
    if len(set(names)) != len(names):
        raise BenchmarkFileError(f"two answer sets carry the same model_id: {names} (answer with --model-id)")
    by_id = [{a.question_id: a for a in s} for s in answer_sets]
    for name, answers in zip(names[1:], by_id[1:], strict=True):
        if set(answers) != set(by_id[0]):
            diff = sorted(map(str, set(answers) ^ set(by_id[0])))[:5]
            raise BenchmarkFileError(f"{name} and {names[0]} answered different questions (e.g. {diff})")
    games = []
    for i, j in combinations(range(len(answer_sets)), 2):
        for qid in by_id[0]:
            games += judge_pair(judge, by_id[i][qid], by_id[j][qid])
    return games
