"""The OpenAI-compatible HTTP API over an AsyncLLM."""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from leanserve.engine.async_llm import AsyncLLM, EngineDeadError
from leanserve.engine.outputs import RequestOutput
from leanserve.params import Logprob, SamplingParams, StructuredOutputs
from leanserve.server.metrics import ServerMetrics
from leanserve.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                       TokenizeRequest)
from leanserve.server.tool_calls import (PARSERS, ToolCallParser, ToolCallStream, messages_for_template,
                                         parser_for_template)

OPEN_PATHS = ("/health", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect")


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class ServerConfig:
    served_model_names: list[str]           # what clients may send as `model`; the first names it in metrics
    api_key: str | None = None
    max_queued_requests: int | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    tool_call_parser: str | None = None     # a name in tool_calls.PARSERS; None: the one the chat template teaches


class ServerState:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0


def create_app(llm: AsyncLLM, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="LeanServe", description="OpenAI-compatible LLM inference server")
    state = ServerState()
    metrics = ServerMetrics(llm, config.served_model_names[0])
    app.state.server = state
    app.state.metrics = metrics
    app.add_middleware(_Gate, config=config, state=state, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif first.get("type") == "extra_forbidden":
            message = f"this server does not support the field {where!r}"
        return APIError(400, f"{message}" + (f" (at {where})" if where else ""), param=where).response()

    def tokenizer():
        return llm.engine.tokenizer

    def check_ready(model: str | None) -> None:
        if state.draining:
            raise APIError(503, "the server is shutting down", "server_error", code="service_unavailable")
        if not llm.alive:
            raise APIError(503, "the model is not loaded or the engine is not running", "server_error",
                           code="service_unavailable")
        if model is not None and model not in config.served_model_names:
            served = ", ".join(f"'{name}'" for name in config.served_model_names)
            raise APIError(404, f"the model '{model}' does not exist; this server serves {served}", param="model",
                           code="model_not_found")
        if config.max_queued_requests is not None and llm.num_waiting >= config.max_queued_requests:
            raise APIError(429, f"too many requests waiting ({llm.num_waiting}); retry shortly",
                           "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})

    def answered_as(model: str | None) -> str:
        """The model name a response carries: the one the request used, or the first served name."""
        return model or config.served_model_names[0]

    async def submit(request_id: str, token_ids: list[int], params: SamplingParams, text: str | None,
                     priority: int) -> AsyncIterator[RequestOutput]:
        try:
            return await llm.submit(request_id, token_ids, params, text, priority)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        except EngineDeadError as e:
            raise APIError(503, str(e), "server_error", code="service_unavailable") from e

    def sampling_params(body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        try:
            return body.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from e

    # ---- chat completions ----------------------------------------------------------------------

    def tool_parser() -> ToolCallParser:
        return PARSERS[config.tool_call_parser] if config.tool_call_parser else parser_for_template(
            tokenizer().chat_template)

    def chat_prompt(body: ChatCompletionRequest | TokenizeRequest) -> str:
        """The conversation rendered through the model's chat template, with the tools it is offered."""
        try:
            messages, template_tools = messages_for_template(
                [m.as_dict() for m in body.messages], body.offered_tools(), tokenizer().chat_template, tool_parser())
            text = tokenizer().apply_chat_template(
                messages, body.add_generation_prompt and not body.continue_final_message, tools=template_tools,
                **(body.chat_template_kwargs or {}))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        if body.continue_final_message:   # the reply goes on from the last message: cut the template's close
            last = messages[-1]["content"] or ""
            text = text[:text.rindex(last) + len(last)] if last in text else text
        return text

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        check_ready(body.model)
        text = chat_prompt(body)
        token_ids = tokenizer().encode(text, add_special_tokens=False)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, body.max_completion_tokens or body.max_tokens, top)
        parser = tool_parser() if body.offered_tools() else None
        if body.forces_tool_call and params.structured_outputs is not None:
            raise APIError(400, "a forced tool call (tool_choice) cannot be combined with a structured output",
                           param="tool_choice")
        if parser and params.structured_outputs is None:      # tool_choice "auto" (lazy) or a forced call
            functions = [t["function"] for t in body.offered_tools()]
            grammar = (parser.call_grammar if body.forces_tool_call else parser.lazy_grammar)(
                functions, body.parallel_tool_calls)
            params = dataclasses.replace(params, structured_outputs=StructuredOutputs(grammar=grammar))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        tracker = metrics.track(len(token_ids))
        stream = await submit(request_id, token_ids, params, text, body.priority)
        created = int(time.time())
        if body.stream:
            chunks = _ChunkMaker(request_id, "chat.completion.chunk", created, answered_as(body.model), body,
                                 len(token_ids))
            return _sse(_chat_chunks(stream, chunks, body, tracker, tokenizer(), parser))
        final = await _collect(stream, raw, tracker)
        choices = []
        for o in final.outputs:
            message, finish_reason = {"role": "assistant", "content": o.text}, o.finish_reason
            content, calls = parser.parse(o.text) if parser else (o.text, [])
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]}
                finish_reason = "tool_calls"
            choices.append({"index": o.index, "message": message, "finish_reason": finish_reason,
                            "logprobs": _chat_logprobs(o.logprobs, tokenizer()) if body.logprobs else None})
        return {"id": request_id, "object": "chat.completion", "created": created,
                "model": answered_as(body.model), "choices": choices, "usage": _usage([final])}

    # ---- completions ---------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        check_ready(body.model)
        prompts = _completion_prompts(body.prompt, tokenizer())
        params = sampling_params(body, body.max_tokens, body.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = []
        try:
            for i, (text, ids) in enumerate(prompts):
                streams.append(await submit(f"{request_id}-{i}", ids, params, text, body.priority))
        except BaseException:                  # an invalid prompt, or the client gone: none of them runs
            for i in range(len(streams)):      # not iterated yet: closing them would not abort them
                llm.abort(f"{request_id}-{i}")
            raise
        trackers = [metrics.track(len(ids)) for _, ids in prompts]
        created = int(time.time())
        if body.stream:
            chunks = _ChunkMaker(request_id, "text_completion", created, answered_as(body.model), body,
                                 sum(len(ids) for _, ids in prompts))
            return _sse(_completion_chunks(streams, trackers, chunks, body, tokenizer()))
        finals = await asyncio.gather(*(_collect(s, raw, t) for s, t in zip(streams, trackers)))
        choices = []
        for p, final in enumerate(finals):
            for o in final.outputs:
                text = (final.prompt or "") + o.text if body.echo else o.text
                choices.append({"index": p * body.n + o.index, "text": text,
                                "logprobs": _completion_logprobs(o.logprobs, tokenizer()) if body.logprobs is not None
                                else None, "finish_reason": o.finish_reason})
        return {"id": request_id, "object": "text_completion", "created": created,
                "model": answered_as(body.model), "choices": choices, "usage": _usage(finals)}

    # ---- the rest ------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        if not llm.alive:
            raise APIError(503, "the model is not loaded", "server_error", code="service_unavailable")
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": int(llm.started_at), "owned_by": "leanserve",
            "root": llm.config.model, "max_model_len": llm.engine.max_model_len} for name in config.served_model_names]}

    @app.get("/health")
    async def health():
        if state.draining or not llm.alive:
            status = "draining" if state.draining else ("failed" if llm.load_error else "loading")
            return JSONResponse({"status": status}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_ready(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'")
        try:
            if body.messages is not None:
                tokens = tokenizer().encode(chat_prompt(body), add_special_tokens=False)
            else:
                tokens = tokenizer().encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        return {"tokens": tokens, "count": len(tokens), "max_model_len": llm.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_ready(body.model)
        vocab = llm.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer().decode(body.tokens, skip_special_tokens=False)}

    return app


# ---- requests and responses --------------------------------------------------------------------

def _completion_prompts(prompt, tokenizer) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) of each prompt of a completion request."""
    if isinstance(prompt, str):
        return [(prompt, tokenizer.encode(prompt))]
    if all(isinstance(p, int) for p in prompt):
        return [(None, list(prompt))]
    return [(p, tokenizer.encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompt]


async def _collect(stream: AsyncIterator[RequestOutput], raw: Request, tracker) -> RequestOutput:
    """The request's final output; aborts it if the client goes away first."""
    async def consume() -> RequestOutput:
        final = None
        async for output in stream:
            tracker.progress(output)
            final = output
        return final

    task = asyncio.ensure_future(consume())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            break
        if await raw.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "the client closed the connection")
    final = task.result()
    if final.error is not None:
        raise APIError(500, f"the request failed inside the engine: {final.error}", "server_error")
    return final


def _usage(finals: list[RequestOutput]) -> dict:
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(f.num_cached_tokens for f in finals)}}


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(logprobs: list[Logprob] | None, tokenizer) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for lp in logprobs or []:
        item = entry(lp.token_id, lp.logprob)
        item["top_logprobs"] = [entry(t, v) for t, v in lp.top]
        content.append(item)
    return {"content": content}


def _completion_logprobs(logprobs: list[Logprob] | None, tokenizer, offset: int = 0) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs or []:
        text = _token_text(tokenizer, lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({_token_text(tokenizer, t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async with _closing(events):
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _stream_error(output: RequestOutput) -> dict:
    return APIError(500, f"the request failed inside the engine: {output.error}", "server_error").body()


def _changed(output: RequestOutput, finished: set[int]) -> list:
    """The choices with news in this output: new text or tokens, or their finish (once: `finished` holds
    the indices whose finish was sent)."""
    changed = [o for o in output.outputs
               if o.text_delta or o.token_ids_delta or (o.finished and o.index not in finished)]
    finished.update(o.index for o in output.outputs if o.finished)
    return changed


class _ChunkMaker:
    """Builds a request's streamed events. With include_usage every chunk has `usage`: null until the last,
    or, with continuous_usage_stats, the tokens so far (`produced` counts the completion tokens sent)."""

    def __init__(self, request_id: str, kind: str, created: int, model: str, body, prompt_tokens: int) -> None:
        self.head = {"id": request_id, "object": kind, "created": created, "model": model}
        self.include_usage, self.continuous = body.include_usage, body.continuous_usage
        self.prompt_tokens, self.produced = prompt_tokens, 0

    def __call__(self, choices: list[dict], usage: dict | None = None) -> dict:
        event = {**self.head, "choices": choices}
        if self.continuous and usage is None:
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.produced,
                     "total_tokens": self.prompt_tokens + self.produced}
        if self.include_usage:
            event["usage"] = usage
        return event

    def count(self, output: RequestOutput) -> None:
        self.produced += sum(len(o.token_ids_delta) for o in output.outputs)


async def _chat_chunks(stream, chunk: _ChunkMaker, body: ChatCompletionRequest, tracker, tokenizer,
                       parser: ToolCallParser | None):
    """The streamed chat events. With tools, each choice's text goes through a ToolCallStream: a complete call
    is sent as OpenAI streams one (its index, id and name first, then its arguments), and the choice finishes
    with "tool_calls" if it made any."""
    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(body.n)])
    final, finished = None, set()
    calls = [ToolCallStream(parser) for _ in range(body.n)] if parser else None
    async with _closing(stream):
        async for output in stream:
            tracker.progress(output)
            chunk.count(output)
            final = output
            if output.error is not None:
                yield _stream_error(output)
                return
            choices = []
            for o in _changed(output, finished):
                logprobs = _chat_logprobs(o.logprobs_delta, tokenizer) if body.logprobs else None
                if calls is None:
                    choices.append({"index": o.index, "delta": {"content": o.text_delta} if o.text_delta else {},
                                    "logprobs": logprobs, "finish_reason": o.finish_reason})
                    continue
                for delta, finish_reason in _tool_deltas(calls[o.index], o):
                    yield chunk([{"index": o.index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish_reason}])
                    logprobs = None
            if choices:
                yield chunk(choices)
    if body.include_usage:
        yield chunk([], _usage([final]))


def _tool_deltas(calls: ToolCallStream, output) -> list[tuple[dict, str | None]]:
    """One choice's streamed deltas for this output's text, and the finish reason on the last."""
    first = calls.num_calls
    content, made = calls.feed(output.text_delta)
    if output.finished:
        rest, more = calls.finish()
        content, made = content + rest, made + more
    deltas: list[tuple[dict, str | None]] = [({"content": content}, None)] if content else []
    for index, call in enumerate(made, start=first):
        header = call.to_openai(index)
        header["function"] = {"name": call.name, "arguments": ""}
        deltas += [({"tool_calls": [header]}, None),
                   ({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}, None)]
    if output.finished:
        finish_reason = "tool_calls" if calls.num_calls else output.finish_reason
        deltas = deltas or [({}, None)]
        deltas[-1] = (deltas[-1][0], finish_reason)
    return deltas


async def _completion_chunks(streams, trackers, chunk: _ChunkMaker, body: CompletionRequest, tokenizer):
    finals: list[RequestOutput | None] = [None] * len(streams)
    offsets: dict[int, int] = {}
    finished: list[set[int]] = [set() for _ in streams]
    async with _closing(_merge(streams)) as merged:
        async for p, output in merged:
            trackers[p].progress(output)
            chunk.count(output)
            finals[p] = output
            if output.error is not None:
                yield _stream_error(output)
                return
            choices = []
            for o in _changed(output, finished[p]):
                index = p * body.n + o.index
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _completion_logprobs(o.logprobs_delta, tokenizer, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs["tokens"])
                choices.append({"index": index, "text": o.text_delta, "logprobs": logprobs,
                                "finish_reason": o.finish_reason})
            if choices:
                yield chunk(choices)
    if body.include_usage:
        yield chunk([], _usage(finals))


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index; closes all at the end."""
    if len(streams) == 1:
        async with _closing(streams[0]):
            async for output in streams[0]:
                yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for output in stream:
                await queue.put((i, output))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, output = await queue.get()
            if output is None:
                remaining -= 1
            else:
                yield i, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _closing:
    """Close an async generator on exit, so an early exit (client gone) aborts the request at once."""

    def __init__(self, stream) -> None:
        self.stream = stream

    async def __aenter__(self):
        return self.stream

    async def __aexit__(self, *exc) -> None:
        await self.stream.aclose()


# ---- the gate: body size, API key, in-flight count, HTTP status metrics -------------------------

class _BodyTooLarge(Exception):
    pass


class _Gate:
    """Pure ASGI middleware (so streaming and disconnects pass straight through)."""

    def __init__(self, app, config: ServerConfig, state: ServerState, metrics: ServerMetrics) -> None:
        self.app, self.config, self.state, self.metrics = app, config, state, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {"code": 500, "sent": False}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        try:
            error = self._refuse(scope, path)
            if error is not None:
                await error.response()(scope, receive, counting_send)
                return
            limit, seen = self.config.max_body_bytes, 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise _BodyTooLarge
                return message

            tracked = path not in OPEN_PATHS
            self.state.in_flight += tracked
            try:
                await self.app(scope, limited_receive, counting_send)
            except _BodyTooLarge:
                if not status["sent"]:
                    await self._too_large().response()(scope, receive, counting_send)
            finally:
                self.state.in_flight -= tracked
        finally:
            self.metrics.http_requests.labels(self.metrics.model_name, scope["method"], _route(path),
                                              str(status["code"])).inc()

    def _refuse(self, scope, path: str) -> APIError | None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
            return self._too_large()
        if self.config.api_key and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.config.api_key.encode()):
                return APIError(401, "missing or invalid API key", "authentication_error", code="invalid_api_key")
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds {self.config.max_body_bytes} bytes",
                        code="request_too_large")


def _route(path: str) -> str:
    """Known paths as they are, anything else as one label value (bounded label cardinality)."""
    known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize") + OPEN_PATHS
    return path if path in known else "other"
