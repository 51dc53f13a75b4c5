"""`Engine`: batched generation over a static KV cache, with requests that come and go (continuous batching).

    engine = Engine(model, tokenizer, slots=8, max_len=2048)
    request = engine.submit("Once upon a time", SamplingParams(max_new_tokens=64, temperature=0.7, seed=1))
    engine.run_until_idle()             # or engine.start(): a background thread steps while there is work
    request.completion().text           # or: for delta in request.deltas(): ...   (streaming)

Each `step()` admits waiting requests into free slots (their prompts prefilled one by one through the model's
ordinary causal path, which yields each one's first token), then decodes one token for every slot at once
(`SlotKVCache`: fixed shapes, one forward for the whole batch; on CUDA replayed as one CUDA graph, with the
sampling inside it). Per request: its own sampling parameters and seed (`qlora.generation.sampling`: its
tokens do not depend on its neighbours), stop token ids and EOS, stop strings (`TextStream`), a token budget,
cancellation. A request ends with finish_reason "stop" (EOS, a stop id or a stop string), "length"
(max_new_tokens, or the cache's max_len) or "cancelled"; a prompt that cannot fit is refused at `submit`.

Threads: `submit`, `Request.cancel` and the readers of a request's deltas may run on any thread; `step` runs
on one (the caller's, or `start()`'s worker). A listener given to `submit` is called on the stepping thread
with each text delta and then None; it must not block (the HTTP server posts into its event loop).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora.generation.adapters import AdapterBank
from qlora.generation.cache import SlotKVCache
from qlora.generation.sampling import BatchSampling, SamplingParams, next_tokens
from qlora.generation.text import TextStream
from qlora.ops import policy_of

log = logging.getLogger("qlora.generation")

Listener = Callable[[str | None], None]


@dataclass(frozen=True)
class Completion:
    """A finished request: its new text (stop string cut), its new token ids, and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int


class Request:
    """One generation request (made by `Engine.submit`); read it as deltas or wait for its `completion()`."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stream: TextStream,
                 listener: Listener | None) -> None:  # fmt: skip
        self.id = next(self._ids)
        self.prompt_ids, self.params, self.stream, self.listener = prompt_ids, params, stream, listener
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.adapter: str | None = None  # set by `Engine.submit`
        self._deltas: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this request (its slot is freed at the engine's next step)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def deltas(self, timeout: float | None = None) -> Iterator[str]:
        """The text as it is generated (blocking), until the request ends."""
        while (delta := self._deltas.get(timeout=timeout)) is not None:
            yield delta

    def completion(self, timeout: float | None = None) -> Completion:
        """Wait for the end; the whole result."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return Completion(self.stream.final_text, list(self.output_ids), self.finish_reason, len(self.prompt_ids))

    def _emit(self, delta: str | None) -> None:
        if delta == "":
            return
        self._deltas.put(delta)
        if self.listener is not None:
            self.listener(delta)

    def _finish(self, reason: str) -> None:
        self._emit(self.stream.finish() if reason != "cancelled" else "")
        self.finish_reason = reason
        self._done.set()
        self._emit(None)


class Engine:
    """Continuous-batching generation for one model (see the module docstring).

    Args:
        model: a `LlamaForCausalLM` (4-bit or 16-bit base, adapters or none), put in eval mode here.
        tokenizer: its `qlora.tokenizer.Tokenizer`.
        slots: sequences decoded together (the batch).
        max_len: positions per slot: prompt + new tokens must fit.
        cuda_graphs: on CUDA, replay the decode step as one CUDA graph.
        stop_token_ids: ids that end every request besides the tokenizer's EOS (e.g. a chat end-of-turn).
        adapters: name -> PEFT adapter directory, loaded beside the model's own adapter (`AdapterBank`); a
            request names one (`submit(adapter=)`), or None for the model as loaded.
    """

    def __init__(self, model, tokenizer, *, slots: int = 8, max_len: int = 2048, cuda_graphs: bool = True,
                 stop_token_ids: tuple[int, ...] = (),
                 adapters: Mapping[str, str | Path] | None = None) -> None:  # fmt: skip
        if slots < 1 or max_len < 2:
            raise ValueError(f"slots must be >= 1 and max_len >= 2, got {slots} and {max_len}")
        windows = {layer.self_attn.sliding_window for layer in model.model.layers} - {None}
        if windows and min(windows) < max_len:
            raise ValueError(f"this model attends within a sliding window of {min(windows)} positions; the engine "
                             f"decodes with full attention: use max_len <= {min(windows)}")  # fmt: skip
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = model.model.embed_tokens.weight.device
        self.vocab = model.lm_head.out_features
        self.slots, self.max_len = slots, max_len
        self.cache = SlotKVCache.for_model(model, slots, max_len)
        self.sampling = BatchSampling.empty(slots, self.vocab, self.device)
        self.tokens = torch.zeros(slots, dtype=torch.int64, device=self.device)  # each slot's next input
        self.generated = torch.zeros(slots, dtype=torch.int64, device=self.device)  # tokens made per slot
        self.next = torch.zeros(slots, dtype=torch.int64, device=self.device)  # the decode step's output
        self.active: list[Request | None] = [None] * slots
        eos = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
        self.stop_token_ids = frozenset((*eos, *stop_token_ids))
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # one per mode: all greedy, or some sampled
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closing = False
        self.bank = AdapterBank(model, adapters, slots).install() if adapters else None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.bank.names) if self.bank is not None else []

    # --- requests ----------------------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None, *, add_bos: bool | None = None,
               listener: Listener | None = None, adapter: str | None = None) -> Request:  # fmt: skip
        """Queue a request: `prompt` as text (encoded here; BOS as the tokenizer adds it) or token ids; `adapter`
        one of `adapter_names` (None: the model as loaded)."""
        params = params or SamplingParams()
        if adapter is not None and adapter not in self.adapter_names:
            served = ", ".join(self.adapter_names) or "none"
            raise ValueError(f"unknown adapter {adapter!r}; this engine serves: {served}")
        if isinstance(prompt, str):
            bos = self.tokenizer.add_bos if add_bos is None else add_bos
            prompt = self.tokenizer.encode(prompt, add_bos=bos and self.tokenizer.bos_id is not None)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this engine holds {self.max_len} positions per "
                             "sequence (prompt + new tokens): shorten it or raise max_len")  # fmt: skip
        if any(not 0 <= t < self.vocab for t in prompt):
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {self.vocab})")
        request = Request(prompt, params, TextStream(self.tokenizer, params.stop), listener)
        request.adapter = adapter
        with self._lock:
            if self._closing:
                raise RuntimeError("the engine is closed")
            self._waiting.append(request)
            self._lock.notify()
        return request

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Every prompt's completion, batched (steps here unless a worker thread runs)."""
        requests = [self.submit(p, params) for p in prompts]
        if self._worker is None:
            self.run_until_idle()
        return [r.completion() for r in requests]

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self.active)

    def run_until_idle(self) -> None:
        while self.busy:
            self.step()

    # --- one step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests into free slots (prefill), then decode one token for every slot."""
        for b, request in enumerate(self.active):
            if request is not None and request.cancelled:
                self._release(b, "cancelled")
        for b in range(self.slots):
            if self.active[b] is None:
                with self._lock:
                    request = self._waiting.popleft() if self._waiting else None
                if request is None:
                    break
                if request.cancelled:
                    request._finish("cancelled")
                    continue
                self._prefill(b, request)
        if any(r is not None for r in self.active):
            self._decode()

    def _prefill(self, b: int, request: Request) -> None:
        self.active[b] = request
        ids = torch.tensor(request.prompt_ids, device=self.device)[None]  # [1, P]
        if self.bank is not None:
            self.bank.select(b, request.adapter)
        with self.bank.only_row(b) if self.bank is not None else contextlib.nullcontext():
            hidden = self.model.hidden_states(ids, kv_cache=self.cache.slot(b))[:, -1]  # [1, H]
        logits = self.model.lm_head(hidden)  # [1, V]
        self.cache.set_position(b, len(request.prompt_ids))
        self.sampling.assign(b, request.params, request.prompt_ids)
        self.generated[b] = 0
        token = next_tokens(logits, self.sampling.rows(b), self.generated[b : b + 1], not request.params.greedy)
        self.tokens[b] = token[0]
        self.generated[b] += 1
        self.sampling.seen[b, token[0]] = True
        self._accept(b, int(token[0]))

    def _decode_once(self, sample: bool) -> None:
        """One token for every slot, into `self.next` (device work only: what a CUDA graph captures); `sample`
        False when every running request is greedy (no sort over the vocabulary)."""
        mask, positions = self.cache.decode_mask(), self.cache.positions[:, None]
        hidden = self.model.hidden_states(self.tokens[:, None], attention_mask=mask, position_ids=positions,
                                          kv_cache=self.cache)[:, -1]  # fmt: skip
        self.next.copy_(next_tokens(self.model.lm_head(hidden), self.sampling, self.generated, sample))
        self.tokens.copy_(self.next)
        self.generated.add_(1)
        self.sampling.seen[torch.arange(self.slots, device=self.device), self.next] = True

    def _decode(self) -> None:
        sample = any(r is not None and not r.params.greedy for r in self.active)
        if self.cuda_graphs:
            if sample not in self._graphs:
                self._graphs[sample] = self._capture(sample)
            self._graphs[sample].replay()
        else:
            self._decode_once(sample)
        for b, token in enumerate(self.next.tolist()):
            if self.active[b] is not None:
                self._accept(b, token)

    def _capture(self, sample: bool) -> torch.cuda.CUDAGraph:
        """The decode step as a CUDA graph; the warm-up's writes (positions, counters, seen tokens) are undone."""
        saved = [t.clone() for t in (self.cache.positions, self.generated, self.tokens, self.sampling.seen)]
        entered = policy_of(self.model).graph_step()  # the graph-step kernels, compiled before the capture
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with entered:
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._decode_once(sample)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._decode_once(sample)
        for t, old in zip((self.cache.positions, self.generated, self.tokens, self.sampling.seen), saved, strict=True):
            t.copy_(old)
        log.info("decode step captured as a CUDA graph (%d slots x %d positions, %s)", self.slots, self.max_len,
                 "sampling" if sample else "greedy")  # fmt: skip
        return graph

    def _accept(self, b: int, token: int) -> None:
        """A new token of slot b's request: stream its text, end the request when it is done."""
        request = self.active[b]
        if (token in self.stop_token_ids and not request.params.ignore_eos) or token in request.params.stop_token_ids:
            self._release(b, "stop")
            return
        request.output_ids.append(token)
        request._emit(request.stream.push(token))
        if request.stream.stopped:
            self._release(b, "stop")
        elif len(request.output_ids) >= request.params.max_new_tokens:
            self._release(b, "length")
        elif len(request.prompt_ids) + len(request.output_ids) >= self.max_len:
            self._release(b, "length")  # the next token's key would not fit in the slot

    def _release(self, b: int, reason: str) -> None:
        request, self.active[b] = self.active[b], None
        self.cache.set_position(b, 0)
        request._finish(reason)

    # --- a worker thread ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Step on a background thread whenever there is work (for a server); `close()` stops it."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="qlora-engine", daemon=True)
            self._worker.start()
        return self

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self.busy:
                    self._lock.wait()
                if self._closing:
                    return
            try:
                self.step()
            except Exception:  # a failed step ends the requests it held, not the server
                log.exception("generation step failed; ending the running requests")
                for b, request in enumerate(self.active):
                    if request is not None:
                        self._release(b, "error")

    def close(self) -> None:
        """Stop the worker (if any); waiting and running requests end as cancelled."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            waiting, self._waiting = list(self._waiting), collections.deque()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        for request in waiting:
            request._finish("cancelled")
        for b, request in enumerate(self.active):
            if request is not None:
                self._release(b, "cancelled")
        if self.bank is not None:
            self.bank.remove()  # the model's layers forward as before
