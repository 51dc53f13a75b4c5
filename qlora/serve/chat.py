"""`qlora chat`: a conversation with a model (+ adapter) in the terminal, in the model's own chat template, each
reply streamed as it is generated.

    qlora chat --model PATH [--adapter DIR] [--system TEXT] [--temperature 0.7] [--max-new-tokens 512]

Lines read are user turns; `/reset` forgets the conversation, `/exit` (or `/quit`, or end of input: Ctrl-D)
ends it; Ctrl-C stops a reply (the interrupted turn is forgotten) and, at the prompt, quits. The whole
history is rendered each turn and decoded by the same engine as `qlora serve` (one slot); a conversation
that no longer fits `--max-len` with room for a reply forgets its oldest turns, and says so. Replies are
greedy unless `--temperature` > 0; turn t samples with seed `--seed` + t, so a session replays exactly.

stdout carries the transcript (the ">>> " prompt and the replies); notices go to stderr.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import TextIO

from qlora.config.commands import ChatConfig
from qlora.generation import Engine, SamplingParams
from qlora.loading import load
from qlora.serve.chat_format import end_of_turn_ids, render_chat

PROMPT = ">>> "
HELP = "/reset forgets the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply"


class Conversation:
    """The messages so far and how to extend them by one exchange."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None) -> None:
        self.engine, self.tokenizer, self.system = engine, engine.tokenizer, system
        self.params = dataclasses.replace(params, stop_token_ids=end_of_turn_ids(self.tokenizer))
        self.messages: list[dict] = []
        self.turns = 0

    def reset(self) -> None:
        self.messages = []

    def prompt_ids(self, user_text: str, notices: TextIO) -> list[int]:
        """The token ids of the history + this user turn, oldest exchanges dropped until a reply has room."""
        room = min(self.params.max_new_tokens, self.engine.max_len // 4)
        history = list(self.messages)
        dropped = 0
        while True:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + history
            text, add_bos = render_chat(self.tokenizer, [*messages, {"role": "user", "content": user_text}])
            ids = self.tokenizer.encode(text, add_bos=add_bos)
            if len(ids) <= self.engine.max_len - room or not history:
                break
            history, dropped = history[2:], dropped + 1  # the oldest user turn and its reply
        if dropped:
            notices.write(f"(the conversation outgrew {self.engine.max_len} positions: forgot its {dropped} oldest "
                          "exchange(s))\n")  # fmt: skip
        if len(ids) >= self.engine.max_len:
            raise ValueError(f"this message alone takes {len(ids)} tokens; the chat holds {self.engine.max_len} "
                             "positions (--max-len): shorten it")  # fmt: skip
        self.messages = history
        return ids

    def reply(self, user_text: str, out: TextIO, notices: TextIO) -> str:
        """Answer `user_text`, writing the reply to `out` as it comes; the exchange joins the history."""
        ids = self.prompt_ids(user_text, notices)
        params = dataclasses.replace(self.params, seed=(self.params.seed + self.turns) % 2**63)
        request = self.engine.submit(ids, params)
        try:
            for delta in request.deltas():
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            request.cancel()
            request.completion()
            out.write("\n")
            notices.write("(reply stopped; this exchange is forgotten)\n")
            return ""
        text = request.completion().text
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        self.turns += 1
        return text


def run_chat(conversation: Conversation, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Read user lines from `stdin` until /exit or end of input, answering each on `stdout`."""
    interactive = stdin is sys.stdin and stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            if interactive:
                line = input(PROMPT)
            else:
                stdout.write(PROMPT)
                stdout.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
        except (EOFError, KeyboardInterrupt):
            stdout.write("\n")
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            conversation.reset()
            stderr.write("(conversation forgotten)\n")
            continue
        if not text:
            continue
        try:
            conversation.reply(text, stdout, stderr)
        except ValueError as e:  # a message too long for --max-len, a template that refuses the turn
            stderr.write(f"({e})\n")
            continue
        stdout.write("\n\n")
        stdout.flush()


def chat_main(argv: Sequence[str]) -> int:
    from qlora.cli_args import parse_config_args

    cfg = parse_config_args(ChatConfig, argv, prog="qlora chat",
                            usage="%(prog)s --model PATH [--adapter DIR] [--system TEXT] [options]")  # fmt: skip
    loaded = load(**dataclasses.asdict(cfg.model))
    if loaded.tokenizer.chat_template is None:
        print(f"qlora chat: error: {cfg.model.path} has no chat template (none in its tokenizer files or GGUF "
              "metadata); for raw text use qlora generate --no-chat-template", file=sys.stderr)  # fmt: skip
        return 2
    s = cfg.sampling
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                            repetition_penalty=s.repetition_penalty, seed=s.seed)  # fmt: skip
    engine = Engine(loaded.model, loaded.tokenizer, slots=1, max_len=cfg.max_len, cuda_graphs=cfg.cuda_graphs)
    engine.start()
    try:
        print(f"chat with {cfg.model.path}" + (f" + {cfg.model.adapter}" if cfg.model.adapter else "")
              + f" ({HELP})", file=sys.stderr)  # fmt: skip
        return run_chat(Conversation(engine, params, cfg.system), sys.stdin, sys.stdout, sys.stderr)
    finally:
        engine.close()
