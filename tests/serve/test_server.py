"""`qlora serve`'s HTTP server, for real: uvicorn on a free port in a thread, spoken to with the official `openai`
client (and raw sockets where a client must misbehave). Every answer is checked against the engine: the base
and each adapter as if loaded alone, streamed or not, one at a time or many at once; bad requests get OpenAI's
error objects; a client that hangs up frees its slot while the others carry on (CPU, stories260K with a chat
template, and SmolLM2's own)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install -e '.[test]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra: pip install -e '.[serve]'")

import qlora  # noqa: E402
from qlora.generation import Engine, SamplingParams  # noqa: E402
from qlora.serve.app import build_app  # noqa: E402
from qlora.serve.chat_format import render_chat  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MAX_LEN = 320
LOAD = dict(quant_type="nf4", compute_dtype="float32", device="cpu")


@dataclass
class Served:
    url: str
    client: openai.OpenAI
    engine: Engine
    submitted: list  # every engine request the server made, in order


def _start(app) -> tuple[uvicorn.Server, threading.Thread, int]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def _serve(engine: Engine, name: str):
    submitted = []
    submit = engine.submit

    def recording(*args, **kwargs):
        request = submit(*args, **kwargs)
        submitted.append(request)
        return request

    engine.submit = recording  # the instance's: the tests see which engine requests each HTTP request made
    server, thread, port = _start(build_app(engine.start(), name))
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    return Served(url, client, engine, submitted), server, thread


def _stop(server, thread, engine):
    server.should_exit = True
    thread.join(30)
    engine.close()


@pytest.fixture(scope="module")
def served(stories_chat_dir, stories_adapters):
    base = qlora.load(stories_chat_dir, **LOAD)
    engine = Engine(base.model, base.tokenizer, slots=4, max_len=MAX_LEN, adapters=stories_adapters)
    s, server, thread = _serve(engine, "stories")
    yield s
    _stop(server, thread, engine)


@pytest.fixture(scope="module")
def reference(stories_chat_dir, stories_adapters):
    """The engine's answer with the model loaded alone (the base, or base + one adapter): what the server must say."""
    engines = {}

    def answer(prompt, params: SamplingParams, adapter: str | None = None, add_bos=None):
        if adapter not in engines:
            loaded = qlora.load(stories_chat_dir, stories_adapters.get(adapter), **LOAD)
            engines[adapter] = Engine(loaded.model, loaded.tokenizer, slots=1, max_len=MAX_LEN)
        engine = engines[adapter]
        request = engine.submit(prompt, params, add_bos=add_bos)
        engine.run_until_idle()
        return request.completion()

    return answer


def _streamed(stream) -> tuple[str, list[str | None], list]:
    """(text, finish reasons in order, chunks) of a streamed completion or chat completion."""
    chunks = list(stream)
    text, finishes = "", []
    for chunk in chunks:
        for choice in chunk.choices:
            text += getattr(choice, "text", None) or getattr(getattr(choice, "delta", None), "content", None) or ""
            finishes.append(choice.finish_reason)
    return text, finishes, chunks


PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They saw"]


def test_models_lists_the_base_and_each_adapter(served):
    models = served.client.models.list().data
    assert [m.id for m in models] == ["stories", "tell", "wise"]
    assert [m.parent for m in models] == [None, "stories", "stories"]


def test_completions_equal_the_engine_streamed_or_not(served, reference):
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    got = served.client.completions.create(model="stories", prompt=PROMPTS[:2], max_tokens=24, temperature=0)
    want = [reference(p, greedy) for p in PROMPTS[:2]]
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [w.text for w in want] and want[0].text != want[1].text
    assert [c.finish_reason for c in got.choices] == ["length", "length"]
    assert got.usage.prompt_tokens == sum(w.prompt_tokens for w in want)
    assert got.usage.completion_tokens == 48 and got.usage.total_tokens == got.usage.prompt_tokens + 48
    streamed = {0: "", 1: ""}
    for chunk in served.client.completions.create(model="stories", prompt=PROMPTS[:2], max_tokens=24, temperature=0,
                                                  stream=True):  # fmt: skip
        streamed[chunk.choices[0].index] += chunk.choices[0].text  # the two choices' deltas interleave
    assert list(streamed.values()) == [w.text for w in want]

    sampled = SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.95, top_k=40, seed=11)
    want = reference(PROMPTS[2], sampled)
    stream = served.client.completions.create(model="stories", prompt=PROMPTS[2], max_tokens=30, temperature=0.9,
                                              top_p=0.95, seed=11, stream=True, extra_body={"top_k": 40},
                                              stream_options={"include_usage": True})  # fmt: skip
    text, finishes, chunks = _streamed(stream)
    assert text == want.text and len(chunks) > 10  # token by token, not one blob
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    other_seed = served.client.completions.create(model="stories", prompt=PROMPTS[2], max_tokens=30,
                                                  temperature=0.9, top_p=0.95, seed=12, extra_body={"top_k": 40})
    assert other_seed.choices[0].text != want.text  # the seed reaches the sampler (negative control)


def test_stop_strings_and_token_id_prompts(served, reference):
    whole = reference(PROMPTS[0], SamplingParams(max_new_tokens=40, temperature=0.0)).text
    stop = whole.split()[4]
    got = served.client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                           stop=[stop, "zzz"])  # fmt: skip
    assert got.choices[0].text == whole[: whole.index(stop)] and got.choices[0].finish_reason == "stop"
    ids = served.engine.tokenizer.encode(PROMPTS[1], add_bos=True)
    by_ids = served.client.completions.create(model="stories", prompt=ids, max_tokens=12, temperature=0)
    by_text = served.client.completions.create(model="stories", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_completions_render_the_template(served, reference):
    messages = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon"},
                {"role": "user", "content": "Go on."}]  # fmt: skip
    text, add_bos = render_chat(served.engine.tokenizer, messages)
    assert text.startswith("<s>user:") and add_bos is False  # the template writes BOS: none added
    want = reference(text, SamplingParams(max_new_tokens=20, temperature=0.0), add_bos=False)
    got = served.client.chat.completions.create(model="stories", messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == want.prompt_tokens == len(served.engine.tokenizer.encode(text))
    assert got.usage.completion_tokens == len(want.token_ids)

    stream = served.client.chat.completions.create(model="stories", messages=messages, max_completion_tokens=20,
                                                   temperature=0, stream=True)  # fmt: skip
    streamed, finishes, chunks = _streamed(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert streamed == want.text and finishes[-1] == got.choices[0].finish_reason and set(finishes[:-1]) == {None}
    parts = served.client.chat.completions.create(
        model="stories", max_tokens=20, temperature=0,
        messages=[*messages[:2], {"role": "user", "content": [{"type": "text", "text": "Go on."}]}])
    assert parts.choices[0].message.content == want.text  # text parts are the same message


def test_each_adapter_answers_as_if_loaded_alone(served, reference):
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    want = {name: reference(PROMPTS[0], params, adapter).text for name, adapter in
            (("stories", None), ("tell", "tell"), ("wise", "wise"))}  # fmt: skip
    assert len(set(want.values())) == 3  # the adapters change the answer (negative control)
    got = {name: served.client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=24,
                                                  temperature=0).choices[0].text for name in want}  # fmt: skip
    assert got == want
    chat = served.client.chat.completions.create(model="wise", messages=[{"role": "user", "content": "Hi."}],
                                                 max_tokens=16, temperature=0)  # fmt: skip
    text, add_bos = render_chat(served.engine.tokenizer, [{"role": "user", "content": "Hi."}])
    want = reference(text, SamplingParams(max_new_tokens=16), "wise", add_bos=add_bos)
    assert chat.choices[0].message.content == want.text


def _ask(client, job):
    model, prompt, seed, stream = job
    kwargs = dict(model=model, max_tokens=32, temperature=0.8, seed=seed)
    if stream:
        return _streamed(client.completions.create(prompt=prompt, stream=True, **kwargs))[0]
    return client.completions.create(prompt=prompt, **kwargs).choices[0].text


def test_concurrent_clients_are_batched_and_get_their_one_at_a_time_answers(served):
    jobs = [(model, prompt, seed, seed % 2 == 0) for seed, (model, prompt) in enumerate(
        [("stories", PROMPTS[0]), ("tell", PROMPTS[1]), ("wise", PROMPTS[2]), ("stories", PROMPTS[1]),
         ("wise", PROMPTS[0]), ("tell", PROMPTS[2]), ("stories", PROMPTS[2])])]  # fmt: skip
    alone = [_ask(served.client, job) for job in jobs]
    busiest, done = 0, threading.Event()

    def watch():  # how many slots decode together while the clients wait
        nonlocal busiest
        while not done.is_set():
            busiest = max(busiest, sum(r is not None for r in served.engine.active))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: _ask(served.client, job), jobs))
    finally:
        done.set()
        watcher.join()
    assert together == alone
    assert busiest >= 2  # the requests shared the batch (4 slots)


def _raw(url: str, path: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_naming_the_field(served):
    c = served.client
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist.*'stories', 'tell', 'wise'") as e:
        c.completions.create(model="nope", prompt="Hi", max_tokens=4)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    cases = [
        (dict(n=2), "n", "n=2 is not supported"),
        (dict(max_tokens=-3), "max_tokens", "max_tokens must be an integer >= 1, got -3"),
        (dict(temperature=-1), "temperature", "temperature must be a number >= 0"),
        (dict(extra_body={"echo": True}), "echo", "echo=True is not supported"),
        (dict(prompt="Once upon a time " * 80), "prompt", f"holds {MAX_LEN} positions"),
        (dict(extra_body={"max_token": 5}), "max_token", "unrecognized request field 'max_token'"),
    ]
    for kwargs, param, message in cases:
        args = {"model": "stories", "prompt": "Hi", "max_tokens": 4, **kwargs}
        with pytest.raises(openai.BadRequestError, match=message) as e:
            c.completions.create(**args)
        assert e.value.status_code == 400 and e.value.body["param"] == param, kwargs
        assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="roles? must be one of") as e:
        c.chat.completions.create(model="stories", messages=[{"role": "wizard", "content": "Hi"}])
    assert e.value.body["param"] == "messages[0].role"

    status, body = _raw(served.url, "/v1/chat/completions", {"model": "stories"})
    assert status == 400 and body["error"]["param"] == "messages" and "messages is required" in body["error"]["message"]
    status, body = _raw(served.url, "/v1/completions", b'{"model": "stories", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _raw(served.url, "/v1/nothing", {})
    assert status == 404 and "/v1/nothing" in body["error"]["message"]
    ok = c.completions.create(model="stories", prompt="Hi", max_tokens=4)  # still serving
    assert ok.choices[0].finish_reason == "length"


@contextlib.contextmanager
def _raw_post(url: str, body: dict, events: int):
    """POST `body` to /v1/completions on a raw socket, read until `events` SSE events came, and hang up on leaving."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
        received = b""
        while received.count(b"data: ") < events:
            chunk = sock.recv(4096)
            assert chunk, "the server closed the stream early"
            received += chunk
        yield


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_client_that_hangs_up_is_cancelled_and_the_others_carry_on(served, reference):
    other = {"model": "tell", "prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0}
    want = reference(PROMPTS[1], SamplingParams(max_new_tokens=60, temperature=0.0), "tell").text
    long = {"model": "stories", "prompt": PROMPTS[0], "max_tokens": 300, "temperature": 0, "stream": True}
    results = {}
    streaming = threading.Thread(target=lambda: results.update(
        other=_streamed(served.client.completions.create(stream=True, **other))[0]))  # fmt: skip
    before = len(served.submitted)
    with _raw_post(served.url, long, events=3):  # the long one streams...
        streaming.start()  # ...when the other one starts streaming beside it
        _wait_for(lambda: len(served.submitted) > before + 1 and served.submitted[before + 1].output_ids)
    hung_up = served.submitted[before]
    assert hung_up.completion(timeout=60).finish_reason == "cancelled"
    assert len(hung_up.output_ids) < 300  # stopped early: greedy stories260K runs to 300 tokens here
    streaming.join(120)
    assert results["other"] == want

    before = len(served.submitted)
    with _raw_post(served.url, {**long, "stream": False}, events=0):  # a non-streaming client gives up too
        _wait_for(lambda: len(served.submitted) > before and served.submitted[before].output_ids)
    assert served.submitted[before].completion(timeout=60).finish_reason == "cancelled"
    _wait_for(lambda: not served.engine.busy)  # every slot free again
    again = served.client.completions.create(**{**other, "max_tokens": 20})
    assert again.choices[0].text == reference(PROMPTS[1], SamplingParams(max_new_tokens=20), "tell").text


def test_the_command_serves_the_base_and_its_adapters(stories_chat_dir, stories_adapters, reference):
    command = [sys.executable, "-m", "qlora", "serve", "--model", str(stories_chat_dir), "--adapter",
               f"tell={stories_adapters['tell']}", "--adapter", str(stories_adapters["wise"]), "--port", "0",
               "--slots", "2", "--max-len", "128", "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        log, port = "", None
        while port is None:
            log += lines.get(timeout=120)
            assert process.poll() is None, log
            if match := re.search(r"running on http://127\.0\.0\.1:(\d+)", log):
                port = int(match.group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        name = stories_chat_dir.name  # the directory's name; the bare adapter DIR is named after its own
        assert [m.id for m in client.models.list().data] == [name, "tell", "wise"]
        for model, adapter in ((name, None), ("tell", "tell"), ("wise", "wise")):
            got = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0)
            assert got.choices[0].text == reference(PROMPTS[0], SamplingParams(max_new_tokens=16), adapter).text
        process.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn stops, the engine closes
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_smollm2_chat_streams_and_ends_at_its_end_of_turn(smollm2_gguf):
    # 16-bit base: the 4-bit one decodes ~7x slower on a CPU (its weights are dequantized at every step)
    loaded = qlora.load(smollm2_gguf, quant_type="none", compute_dtype="float32", device="cpu")
    engine = Engine(loaded.model, loaded.tokenizer, slots=2, max_len=256)
    s, server, thread = _serve(engine, "smollm2")
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        got = s.client.chat.completions.create(model="smollm2", messages=messages, max_tokens=48, temperature=0)
        answer = got.choices[0].message.content
        assert "Paris" in answer and got.choices[0].finish_reason == "stop"  # <|im_end|>, long before 48 tokens
        assert "<|im" not in answer and got.usage.completion_tokens < 48
        text, finishes, _ = _streamed(s.client.chat.completions.create(model="smollm2", messages=messages,
                                                                       max_tokens=48, temperature=0, stream=True))
        assert text == answer and finishes[-1] == "stop"
    finally:
        _stop(server, thread, engine)


def test_qlora_eval_judge_can_ask_a_qlora_serve(served, reference):
    """The judge's OpenAI client (`qlora.eval.judge.OpenAIJudge`) talks to the server: its request shape is
    accepted and its reply is the engine's chat answer (here a tiny model judging, so only the plumbing counts)."""
    from qlora.eval.judge import OpenAIJudge

    judge = OpenAIJudge(f"{served.url}/v1", "wise", max_tokens=12, retries=1)
    messages = [{"role": "system", "content": "Judge."}, {"role": "user", "content": "Which is better?"}]
    text, add_bos = render_chat(served.engine.tokenizer, messages)
    want = reference(text, SamplingParams(max_new_tokens=12, temperature=0.0), adapter="wise", add_bos=add_bos)
    assert judge.complete("Judge.", "Which is better?") == want.text
