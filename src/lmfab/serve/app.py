"""``lmfab serve``: an OpenAI-compatible HTTP API for a trained run, on FastAPI + uvicorn.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream server-sent
events in OpenAI's chunk format with ``"stream": true``), ``GET /v1/models``,
``GET /health``. Concurrent requests are decoded together in batches
(:class:`~lmfab.serve.batcher.Batcher`). Errors come back in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed body or a prompt
longer than the model's context, 404 for another model's name.

Sampling fields: ``max_tokens`` (default 16), ``temperature`` (default 1; 0 is greedy),
``top_p``, ``top_k`` (an extension), ``stop`` (a string or a list), ``seed`` (default 0:
the same request gives the same text). ``n`` must be 1.

Base models have no chat format of their own, so chat requests are rendered with a plain one
(:func:`chat_prompt`)::

    System: {system message}

    User: {message}

    Assistant: {message}

    User: {message}

    Assistant:

and the reply stops before the next ``"\\nUser:"``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmfab.infer.generate import Completion, PromptTooLong, Request, encode_prompt
from lmfab.serve.batcher import Batcher

CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param,
            "code": self.code}})


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("one prompt per request (send several requests: they are "
                                 "batched)")
            return v[0]
        return v


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The plain chat format for base models (see the module docstring)."""
    turns = [f"{CHAT_ROLES[m.role]}: {m.content.strip()}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(model, tokenizer, *, model_name: str = "lmfab", max_batch_size: int = 16,
               compile: bool | None = None) -> FastAPI:
    """The FastAPI app serving ``model``; its batcher thread stops with the app."""
    batcher = Batcher(model, tokenizer, max_batch_size=max_batch_size, compile=compile)
    context = model.cfg.max_seq_len
    created = int(time.time())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="lmfab", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_req, e: RequestValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {err.get('msg')}")
        return APIError(400, "invalid request: " + "; ".join(parts),
                        param=None).response()

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server has "
                           f"{model_name!r}", param="model", code="model_not_found")

    def make_request(body: _Sampling, prompt: str, extra_stop: list[str]) -> Request:
        try:
            ids, _ = encode_prompt(tokenizer, prompt, context, on_long_prompt="refuse")
        except PromptTooLong as e:
            raise APIError(400, f"{e}", param="prompt", code="context_length_exceeded") from None
        return Request(ids, max_new_tokens=body.max_tokens or 16, temperature=body.temperature,
                       top_k=body.top_k, top_p=body.top_p, stop=body.stops() + extra_stop,
                       seed=0 if body.seed is None else body.seed)

    async def run(req: Request) -> Completion:
        job = batcher.submit(req)
        try:
            while True:
                item = await job.pieces.get()
                if isinstance(item, BaseException):
                    raise APIError(500, f"generation failed: {item}", type="server_error")
                if isinstance(item, Completion):
                    return item
        finally:
            job.cancel.set()

    async def stream(req: Request, chunk) -> AsyncIterator[str]:
        job = batcher.submit(req)
        try:
            first = chunk(None, None, start=True)
            if first is not None:
                yield _sse(first)
            while True:
                item = await job.pieces.get()
                if isinstance(item, BaseException):
                    yield _sse({"error": {"message": f"generation failed: {item}",
                                          "type": "server_error", "param": None, "code": None}})
                    break
                if isinstance(item, Completion):
                    yield _sse(chunk(None, item.finish_reason))
                    break
                yield _sse(chunk(item, None))
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: the batcher drops the row
            job.cancel.set()

    def usage(c: Completion) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids),
                "total_tokens": c.prompt_tokens + len(c.token_ids)}

    def finish(reason: str) -> str:
        return "length" if reason == "length" else "stop"

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "lmfab",
             "context_length": context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        check_model(body.model)
        req = make_request(body, body.prompt, [])
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(text, reason, start=False):
                if start:
                    return None
                return {"id": rid, "object": "text_completion", "created": now,
                        "model": model_name, "choices": [{
                            "index": 0, "text": text or "", "logprobs": None,
                            "finish_reason": None if reason is None else finish(reason)}]}
            return StreamingResponse(stream(req, chunk), media_type="text/event-stream")
        c = await run(req)
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "text": c.text, "logprobs": None,
                             "finish_reason": finish(c.finish_reason)}], "usage": usage(c)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        check_model(body.model)
        req = make_request(body, chat_prompt(body.messages), [CHAT_STOP])
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(text, reason, start=False):
                delta = ({"role": "assistant", "content": ""} if start else
                         {} if reason is not None else {"content": text})
                return {"id": rid, "object": "chat.completion.chunk", "created": now,
                        "model": model_name, "choices": [{
                            "index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": None if reason is None else finish(reason)}]}
            return StreamingResponse(stream(req, chunk), media_type="text/event-stream")
        c = await run(req)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": c.text},
                             "logprobs": None, "finish_reason": finish(c.finish_reason)}],
                "usage": usage(c)}

    return app


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", quantize: str | None = None, max_batch_size: int = 16,
          model_name: str | None = None) -> None:
    """Load a run and serve it until interrupted (``lmfab serve``)."""
    import uvicorn

    from lmfab.infer.generate import load_for_inference

    model, tok, ckpt, report = load_for_inference(model_dir, device=device, quantize=quantize)
    name = model_name or Path(model_dir).resolve().name
    if report is not None:
        print(f"quantized: {report.summary()}")
    print(f"serving {ckpt} as {name!r} on http://{host}:{port}/v1")
    uvicorn.run(create_app(model, tok, model_name=name, max_batch_size=max_batch_size),
                host=host, port=port, log_level="info")
