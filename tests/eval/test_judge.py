"""Pairwise judging: both orders asked, verdicts parsed, a local model judge and an HTTP judge.

The HTTP judge talks to a fake OpenAI-compatible server on loopback (http.server in a thread): a test
double for the wire protocol only. It prefers the answer containing "GOOD"; when neither or both do,
it always names the first answer, a pure position bias that the two orders must cancel.
"""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import qlora
from qlora.eval.benchmarks import Answer
from qlora.eval.elo import elo_table
from qlora.eval.judge import JudgeError, LocalModelJudge, OpenAIJudge, judge_all_pairs, judge_pair, parse_verdict
from qlora.tokenizer import Tokenizer

ANSWER = re.compile(r"\[The Start of Assistant (\d)'s Answer\]\n(.*?)\n\[The End", re.S)


class FakeChatServer:
    def __init__(self, fail_with: int | None = None):
        self.requests, self.fail_with = [], fail_with
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if outer.fail_with:
                    self.send_response(outer.fail_with)
                    self.end_headers()
                    self.wfile.write(b"upstream exploded")
                    return
                answers = dict(ANSWER.findall(body["messages"][1]["content"]))
                good = ["GOOD" in answers["1"], "GOOD" in answers["2"]]
                verdict = "2" if good == [False, True] else "1"  # otherwise: position bias, first wins
                reply = {"choices": [{"message": {"role": "assistant", "content": f"Reasoning...\n{verdict}"}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def answers(model_id, good_ids, n=4):
    return [Answer(q, "generic", f"question {q}?", "", ("GOOD answer" if q in good_ids else "meh"), model_id)
            for q in range(n)]  # fmt: skip


def test_http_judge_sends_openai_requests_and_both_orders_cancel_position_bias():
    sets = [answers("strong", {0, 1, 2, 3}), answers("medium", {0, 1}), answers("weak", set())]
    with FakeChatServer() as server:
        judge = OpenAIJudge(server.url, "judge-model", api_key="sk-test")
        games = judge_all_pairs(judge, sets)
    assert len(server.requests) == len(games) == 3 * 4 * 2
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge-model" and [m["role"] for m in first["body"]["messages"]] == [
        "system", "user"]  # fmt: skip
    # each question of each pair was shown in both orders
    shown = [(g["question_id"], g["model_a"], g["model_b"]) for g in games]
    assert all((q, b, a) in shown for q, a, b in shown)
    table = elo_table(games, orderings=2000)
    assert list(table) == ["strong", "medium", "weak"]
    # medium vs weak on questions 2, 3 (both "meh"): the judge always picks the first shown -> one win each
    tied = [g for g in games if {g["model_a"], g["model_b"]} == {"medium", "weak"} and g["question_id"] >= 2]
    assert sorted(g["winner"] for g in tied) == ["medium", "medium", "weak", "weak"]


def test_http_errors_are_reported_with_the_status():
    with FakeChatServer(fail_with=503) as server:
        judge = OpenAIJudge(server.url, "m", retries=2, retry_wait=0.0)
        with pytest.raises(JudgeError, match=r"2 attempt\(s\): HTTP 503: upstream exploded"):
            judge("q", "a", "b")
    with FakeChatServer(fail_with=401) as server, pytest.raises(JudgeError, match="1 attempt"):
        OpenAIJudge(server.url, "m", retries=3, retry_wait=0.0)("q", "a", "b")  # a client error is not retried


def test_parse_verdict():
    assert parse_verdict("blah\n2") == 2 and parse_verdict("x\n**3**\n") == 3
    assert parse_verdict("Final verdict: [[A]]") == 1 and parse_verdict("[[C]]") == 3
    assert parse_verdict("I prefer the second one.") is None


def test_unparsed_verdict_is_a_marked_tie():
    games = judge_pair(lambda q, a, b: (None, "no idea"), *[answers(m, set(), 1)[0] for m in ("p", "q")])
    assert [g["winner"] for g in games] == ["tie", "tie"] and not any(g["parsed"] for g in games)


def test_local_model_judge_reads_the_verdict_logits(stories260k_dir):
    model = qlora.load_model(stories260k_dir, "nf4", compute_dtype=torch.float32, device="cpu")
    tokenizer = Tokenizer.from_pretrained(stories260k_dir)
    judge = LocalModelJudge(model, tokenizer)
    assert [tokenizer.id_to_token(i) for i in judge.verdict_ids] == ["1", "2", "3"]
    assert [tokenizer.id_to_token(i) for i in judge.prefix_ids] == ["▁"]  # "1" encodes as "▁" "1"
    a, b = Answer(1, "", "Who is Lily?", "", "A girl.", "m1"), Answer(1, "", "Who is Lily?", "", "A dog.", "m2")
    verdict, raw = judge(a.question, a.text, b.text)
    # the verdict is the argmax of the 1/2/3 logits after the prompt and the shared "▁"
    ids = [tokenizer.bos_id, *tokenizer.encode(judge.prompt(a.question, a.text, b.text)), *judge.prefix_ids]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1, judge.verdict_ids]
    assert verdict == int(logits.argmax()) + 1
    assert raw == "logits 1/2/3: " + ", ".join(f"{v:.3f}" for v in logits.tolist())
    games = judge_all_pairs(judge, [[a], [b]])
    assert [(g["model_a"], g["model_b"]) for g in games] == [("m1", "m2"), ("m2", "m1")]
    assert {g["winner"] for g in games} <= {"m1", "m2", "tie"}


def test_answer_sets_must_match():
    with pytest.raises(ValueError, match="different questions"):
        judge_all_pairs(lambda *x: (1, ""), [answers("a", set(), 3), answers("b", set(), 2)])
    with pytest.raises(ValueError, match="same model_id"):
        judge_all_pairs(lambda *x: (1, ""), [answers("a", set()), answers("a", set())])
