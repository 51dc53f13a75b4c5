"""Talking to a finetune: `qlora serve` (an OpenAI-compatible HTTP server over the batching engine, several
adapters on one base) and `qlora chat` (a conversation in the terminal).

    app.py          the Starlette routes: /v1/models, /v1/completions, /v1/chat/completions (+ SSE streaming)
    openai_api.py   OpenAI's request fields checked into the engine's SamplingParams; response and chunk shapes
    chat_format.py  messages through the chat template; the tokens that end an assistant turn
    command.py      `qlora serve`: load, build the engine, run uvicorn
    chat.py         `qlora chat`

The HTTP dependencies (starlette, uvicorn) are the `serve` extra: `pip install qlora[serve]`.
"""
