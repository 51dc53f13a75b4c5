"""`qlora chat`: each reply is the engine's greedy answer to the whole conversation in the chat template,
/reset forgets it, /exit and end of input end the session, a conversation too long for the cache forgets its
oldest turns; the command itself on piped stdin (stories260K with a chat template, SmolLM2 with its own)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qlora
from qlora.generation import Engine, SamplingParams
from qlora.serve.chat import PROMPT, Conversation, run_chat
from qlora.serve.chat_format import end_of_turn_ids, render_chat

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stories_chat(stories_chat_dir):
    return qlora.load(stories_chat_dir, quant_type="nf4", compute_dtype="float32", device="cpu")


def _greedy(loaded, messages, n):
    text, add_bos = render_chat(loaded.tokenizer, messages)
    engine = Engine(loaded.model, loaded.tokenizer, slots=1, max_len=256)
    request = engine.submit(text, SamplingParams(max_new_tokens=n), add_bos=add_bos)
    engine.run_until_idle()
    return request.completion().text


def _replies(transcript: str) -> list[str]:
    """The replies of a transcript (">>> reply\\n\\n" per answered line; commands and end of input print none)."""
    return [part.removesuffix("\n\n") for part in transcript.split(PROMPT)[1:] if part.endswith("\n\n")]


def test_replies_follow_the_history_and_reset_forgets_it(stories_chat):
    engine = Engine(stories_chat.model, stories_chat.tokenizer, slots=1, max_len=256).start()
    try:
        stdin = io.StringIO("Tell me a story.\nGo on.\n/reset\n\nTell me a story.\n/exit\nnever read\n")
        out, err = io.StringIO(), io.StringIO()
        assert run_chat(Conversation(engine, SamplingParams(max_new_tokens=20)), stdin, out, err) == 0
    finally:
        engine.close()
    first, second, after_reset = _replies(out.getvalue())
    u1, u2 = {"role": "user", "content": "Tell me a story."}, {"role": "user", "content": "Go on."}
    assert first == _greedy(stories_chat, [u1], 20)
    assert second == _greedy(stories_chat, [u1, {"role": "assistant", "content": first}, u2], 20)
    assert second != _greedy(stories_chat, [u2], 20)  # the history reached the model (negative control)
    assert after_reset == first  # nothing of the first exchange is left
    assert "(conversation forgotten)" in err.getvalue() and stdin.read() == "never read\n"


def test_a_long_conversation_forgets_its_oldest_exchanges(stories_chat):
    engine = Engine(stories_chat.model, stories_chat.tokenizer, slots=1, max_len=64).start()
    conversation = Conversation(engine, SamplingParams(max_new_tokens=16))
    try:
        stdin = io.StringIO("Tell me a story.\n" * 4 + "word " * 80 + "\nThe end.\n")  # no /exit: end of input
        out, err = io.StringIO(), io.StringIO()
        assert run_chat(conversation, stdin, out, err) == 0
    finally:
        engine.close()
    assert "oldest exchange" in err.getvalue()
    assert "this message alone takes" in err.getvalue()  # refused, and the chat goes on
    assert len(_replies(out.getvalue())) == 5 and 2 <= len(conversation.messages) < 10
    assert conversation.messages[-2] == {"role": "user", "content": "The end."}


class _Vocab:
    """A tokenizer's chat parts, Llama 3's way: turns end with <|eot_id|>, EOS is <|end_of_text|>."""

    chat_template = "{% for m in messages %}<|start_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}"
    eos_id = 128001
    ids = {"<|eot_id|>": 128009, "<|end_of_text|>": 128001, "<|end|>": 7}

    def token_to_id(self, spelling):
        return self.ids.get(spelling)


def test_the_end_of_turn_token_is_the_one_the_template_writes():
    assert end_of_turn_ids(_Vocab()) == (128009,)  # not <|end|> (a token, but not in the template), not EOS
    no_template = _Vocab()
    no_template.chat_template = None
    assert end_of_turn_ids(no_template) == ()


def _chat(args, stdin: str, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qlora", "chat", *args], input=stdin, capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)  # fmt: skip


def test_the_command_reads_piped_stdin_until_its_end(stories_chat_dir, stories260k_dir):
    common = ["--quant-type", "nf4", "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "8"]
    done = _chat(["--model", str(stories_chat_dir), *common], "Tell me a story.\n")
    assert done.returncode == 0, done.stderr
    assert len(_replies(done.stdout)) == 1 and "/reset forgets the conversation" in done.stderr
    refused = _chat(["--model", str(stories260k_dir), *common], "Hi.\n")
    assert refused.returncode == 2 and "has no chat template" in refused.stderr


@pytest.mark.slow
def test_smollm2_in_the_terminal(smollm2_gguf):
    # 16-bit base: the 4-bit one decodes ~7x slower on a CPU (its weights are dequantized at every step)
    args = ["--model", str(smollm2_gguf), "--quant-type", "none", "--dtype", "float32", "--device", "cpu",
            "--max-new-tokens", "32", "--max-len", "512"]  # fmt: skip
    turns = "What is the capital of France?\nAnd of Germany?\n/reset\nWhat is the capital of France?\n/exit\n"
    done = _chat(args, turns)
    assert done.returncode == 0, done.stderr
    first, second, after_reset = _replies(done.stdout)
    assert "Paris" in first and "<|im" not in first
    assert "Berlin" in second  # "And of Germany?" means something only after the first exchange
    assert after_reset == first
