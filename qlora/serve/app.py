"""The HTTP server: OpenAI's /v1/models, /v1/completions and /v1/chat/completions over one `Engine`, as a
Starlette application (run by uvicorn: `qlora serve`).

Why Starlette and not FastAPI: the routes are three, and every request is checked by `openai_api` so that
its errors are OpenAI's error objects naming the field; FastAPI's models would add a second validator
whose 422s have another shape. Starlette is FastAPI's own foundation, with uvicorn its usual server.

Threads: the event loop handles HTTP; the engine steps on its own worker thread (`Engine.start`), where
every request of every client is batched with the others. A request's text deltas come back through a
listener the engine calls on its thread, which only posts them into the loop
(`loop.call_soon_threadsafe`): the engine never waits for a client. Each HTTP request owns its engine
requests and cancels them however it ends: a streaming client that disconnects (uvicorn cancels the
stream, or the next write fails) and a non-streaming one that hangs up while it waits both free their
slots at the engine's next step; the other requests never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qlora.generation import Completion, Engine, Request
from qlora.serve import openai_api as api
from qlora.serve.chat_format import end_of_turn_ids, render_chat

log = logging.getLogger("qlora.serve")


class Server:
    """What the routes serve: one engine, the base model's name and the adapters' names, the chat format."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.adapters = tuple(getattr(engine, "adapter_names", ()))
        if model_name in self.adapters:
            raise ValueError(f"an adapter is named {model_name!r}, as the base model is: rename one")
        self.chat_stop_ids = end_of_turn_ids(engine.tokenizer)
        self.created = int(time.time())

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base); 404 for a name this server does not have."""
        if model == self.model_name:
            return None
        if model in self.adapters:
            return model
        names = ", ".join(repr(n) for n in (self.model_name, *self.adapters))
        raise api.ApiError(404, f"the model {model!r} does not exist on this server; it serves {names}",
                           param="model", code="model_not_found")  # fmt: skip

    # --- routes -----------------------------------------------------------------------------------------------
    async def models(self, request: HttpRequest) -> Response:
        cards = [api.model_card(self.model_name, self.created, None)]
        cards += [api.model_card(name, self.created, self.model_name) for name in self.adapters]
        return JSONResponse({"object": "list", "data": cards})

    async def completions(self, request: HttpRequest) -> Response:
        generation = api.parse_completion(await _json_body(request))
        return await self._respond(request, generation, chat=False)

    async def chat_completions(self, request: HttpRequest) -> Response:
        generation, messages = api.parse_chat(await _json_body(request))
        if self.engine.tokenizer.chat_template is None:
            raise api.ApiError(400, f"the model {self.model_name!r} has no chat template (none in its tokenizer "
                               "files): use /v1/completions with a prompt you format yourself",
                               param="messages")  # fmt: skip
        try:
            text, add_bos = render_chat(self.engine.tokenizer, messages)
        except ValueError as e:
            raise api.bad("messages", str(e)) from e
        params = dataclasses.replace(generation.params, stop_token_ids=self.chat_stop_ids)
        generation = dataclasses.replace(generation, prompts=[text], params=params, add_bos=add_bos)
        return await self._respond(request, generation, chat=True)

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    # --- one request ------------------------------------------------------------------------------------------
    async def _respond(self, http: HttpRequest, generation: api.Generation, *, chat: bool) -> Response:
        adapter = self.adapter_for(generation.model)
        queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
        requests = self._submit(generation, adapter, _poster(asyncio.get_running_loop(), queue), chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = (rid, int(time.time()), generation.model)
        if generation.stream:
            events = self._events(queue, requests, head, chat, generation.include_usage)
            return _EngineStream(events, requests, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        try:
            if not await _all_ended(queue, len(requests), http):
                return Response(status_code=499)  # the client is gone; nobody reads this
        finally:
            for r in requests:
                r.cancel()  # a no-op for the finished ones
        completions = [r.completion() for r in requests]
        _raise_for_failure(completions)
        body = api.chat_body(*head, completions[0]) if chat else api.completion_body(*head, completions)
        return JSONResponse(body)

    def _submit(self, generation: api.Generation, adapter: str | None, post, chat: bool) -> list[Request]:
        requests: list[Request] = []
        extra = {} if adapter is None else {"adapter": adapter}
        try:
            for i, prompt in enumerate(generation.prompts):
                requests.append(self.engine.submit(prompt, generation.params, add_bos=generation.add_bos,
                                                   listener=partial(post, i), **extra))  # fmt: skip
        except (ValueError, RuntimeError) as e:
            for r in requests:
                r.cancel()
            if isinstance(e, RuntimeError):  # the engine is closed: the server is stopping
                raise api.ApiError(503, f"the server is shutting down: {e}", kind="server_error") from e
            where = "messages" if chat else "prompt"
            index = f"{where}[{len(requests)}]: " if len(generation.prompts) > 1 else ""
            raise api.bad(where, f"{index}{e}") from e
        return requests

    async def _events(self, queue: asyncio.Queue, requests: list[Request], head: tuple, chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
        """The SSE stream: (chat: the role first) text deltas as they come, each choice's finish, [DONE]."""
        try:
            if chat:
                yield _sse(api.chat_chunk(*head, {"role": "assistant", "content": ""}, None))
            ended = 0
            while ended < len(requests):
                index, delta = await queue.get()
                if delta is not None:
                    yield _sse(api.chat_chunk(*head, {"content": delta}, None) if chat else
                               api.completion_chunk(*head, index, delta, None))  # fmt: skip
                    continue
                ended += 1
                completion = requests[index].completion()
                if completion.finish_reason not in api.FINISH_REASONS:
                    yield _sse(_failure(completion).body())
                    return
                finish = api.FINISH_REASONS[completion.finish_reason]
                yield _sse(api.chat_chunk(*head, {}, finish) if chat else api.completion_chunk(*head, index, "",
                                                                                               finish))  # fmt: skip
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield _sse(api.usage_chunk(*head, obj, [r.completion() for r in requests]))
            yield "data: [DONE]\n\n"
        finally:
            for r in requests:
                r.cancel()


def build_app(engine: Engine, model_name: str) -> Starlette:
    """The ASGI application serving `engine` (started by the caller: `engine.start()`) as `model_name`."""
    server = Server(engine, model_name)
    routes = [Route("/v1/models", server.models, methods=["GET"]),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
              Route("/health", server.health, methods=["GET"])]  # fmt: skip
    handlers = {api.ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.server = server
    return app


# --- plumbing -----------------------------------------------------------------------------------------------------
class _EngineStream(StreamingResponse):
    """A streamed response that cancels its engine requests however it ends (finished, disconnected, failed)."""

    def __init__(self, content: AsyncIterator[str], requests: list[Request], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.requests = requests

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for r in self.requests:
                r.cancel()


def _poster(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[int, str | None], None]:
    """The engine-thread listener of choice `index`: hands each delta (then None) to the event loop."""

    def post(index: int, delta: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed (the server stopped): nobody is waiting
            loop.call_soon_threadsafe(queue.put_nowait, (index, delta))

    return post


async def _all_ended(queue: asyncio.Queue, count: int, http: HttpRequest) -> bool:
    """Wait until `count` choices have ended; False as soon as the client disconnects."""
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        ended = 0
        while ended < count:
            item = asyncio.ensure_future(queue.get())
            await asyncio.wait({item, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not item.done():
                item.cancel()
                return False
            ended += item.result()[1] is None
        return True
    finally:
        gone.cancel()


async def _disconnected(http: HttpRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _json_body(http: HttpRequest) -> dict:
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise api.bad(None, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise api.bad(None, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _failure(completion: Completion) -> api.ApiError:
    if completion.finish_reason == "cancelled":
        return api.ApiError(503, "the request was cancelled: the server is shutting down", kind="server_error")
    return api.ApiError(500, "generation failed on the server (its log has the traceback)", kind="server_error")


def _raise_for_failure(completions: list[Completion]) -> None:
    for c in completions:
        if c.finish_reason not in api.FINISH_REASONS:
            raise _failure(c)


async def _api_error(request: HttpRequest, exc: api.ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: HttpRequest, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(api.ApiError(exc.status_code, message, kind=kind).body(), status_code=exc.status_code)


async def _server_error(request: HttpRequest, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    body = api.ApiError(500, f"internal server error: {type(exc).__name__}: {exc}", kind="server_error").body()
    return JSONResponse(body, status_code=500)
