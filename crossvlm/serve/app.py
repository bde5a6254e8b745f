"""The FastAPI application: OpenAI's chat completions (plain and streamed), models, health, metrics, chat page.

Every refusal is a 4xx with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`;
every request field is honoured or refused (docs/SERVING.md lists them). A request's cost is bounded
before work is done for it (body bytes, JSON structures, characters, images), its body is parsed and
checked, its images decoded and its text tokenized in worker threads, all before it reaches the engine,
so a bad or oversized request never stalls or disturbs the others. When every slot is busy requests wait; past `max_waiting` waiting ones the
server answers 429 with `Retry-After`. A request whose generation fails gets a 500 in the same
format (in the stream, if its first token was sent) while the others go on.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from crossvlm.engine import GenerationError, QueueFull
from crossvlm.errors import CrossVLMError
from crossvlm.inference import ChatModel, Completion, Delta, InputError, Prompt, SamplingParams
from crossvlm.serve.images import ImagePolicy, image_from_url
from crossvlm.serve.metrics import Metrics
from crossvlm.serve.schema import ChatCompletionRequest, ResponseIds, error_body, usage

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerSettings:
    """How the server answers; `crossvlm serve` fills it from its options."""

    model_name: str = "crossvlm"
    """The id `GET /v1/models` lists; a request naming another model gets 404 `model_not_found`."""
    api_key: str | None = None
    """When set, /v1 routes need `Authorization: Bearer <api_key>`."""
    images: ImagePolicy = field(default_factory=ImagePolicy)
    max_waiting: int = 1024
    """Requests that may wait for a slot; more get 429 with Retry-After."""
    retry_after: int = 1
    """Seconds a refused client is told to wait (`Retry-After`)."""
    default_max_tokens: int = 512
    """Token budget of a request that gives no max_tokens (less where the context has less room left)."""
    thinking: bool = False
    """Thinking mode for requests that do not choose (`chat_template_kwargs.enable_thinking`)."""
    max_request_bytes: int = 64_000_000


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _failed(err: BaseException) -> APIError:
    """The 500 of a request whose generation failed."""
    return APIError(500, f"generation failed: {err}", "server_error", "generation_failed")


class Mailbox:
    """Events from the engine's thread to the event loop, handed over with one wake-up of the loop per
    batch of them (an engine step yields one event per running stream), not one per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self._items, self._lock = loop, [], threading.Lock()

    def post(self, queue: asyncio.Queue, event) -> None:
        with self._lock:
            self._items.append((queue, event))
            if len(self._items) > 1:
                return  # a hand-over is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def _hand_over(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, event in items:
            queue.put_nowait(event)


class Job:
    """One request's events, delivered from the engine's thread to the asyncio loop that submitted it."""

    def __init__(self, chat: ChatModel, mailbox: Mailbox, prepared: "Prepared", stream: bool, max_waiting: int):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine = chat.engine
        self.request = chat.submit(prepared.prompt, prepared.sampling, lambda event: mailbox.post(self.queue, event),
                                   stream=stream, max_waiting=max_waiting, matcher=prepared.matcher)

    def cancel(self) -> None:
        """The client has gone: stop generating for it (its slot is free at the engine's next step)."""
        if not self.request.done:
            self.engine.cancel(self.request)
            self.count("abort")

    def watch(self, metrics: Metrics, arrived: float) -> None:
        """Count this request in `metrics` when it ends (`arrived`: when its body was in)."""
        self._metrics, self._arrived = metrics, arrived

    def count(self, reason: str) -> None:
        metrics, self._metrics = getattr(self, "_metrics", None), None
        if metrics is not None:
            metrics.finished(self.request, self._arrived, reason)

    async def events(self):
        """Deltas, then the completion; raises a failure. The first delta goes out alone (the time to
        the first token); later ones that piled up while the client was being written to go out merged."""
        pending: deque = deque()
        first = True
        while True:
            if not pending:
                pending.append(await self.queue.get())
            while not self.queue.empty():
                pending.append(self.queue.get_nowait())
            event = pending.popleft()
            while not first and isinstance(event, Delta) and pending and isinstance(pending[0], Delta):
                more = pending.popleft()
                event = Delta(event.reasoning + more.reasoning, event.text + more.text)
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Completion):
                self.count("abort" if event.finish_reason == "cancelled" else event.finish_reason)
            first = first and not (isinstance(event, Delta) and (event.text or event.reasoning))
            yield event
            if isinstance(event, Completion):
                return


# Characters JSON leaves as they are but line readers split on (Python's str.splitlines, which httpx's
# aiter_lines uses): escaped, so one event stays one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(body: dict | str) -> str:
    if not isinstance(body, str):
        body = json.dumps(body, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)
    return f"data: {body}\n\n"


class BodyLimit:
    """ASGI middleware: a 413 for a request body over `limit` bytes. A Content-Length over it is refused
    before the body is read; a body without one (chunked) is read up to the limit and refused there,
    then handed on whole, so no body over the limit reaches the app either way.

    Plain ASGI on purpose: a `@app.middleware("http")` function runs every response through a task and a
    memory stream of its own, which for a streamed answer is every token's chunk (at 64 streams that
    doubled the event loop's time per token)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is not None:
                if length.isdigit() and int(length) > self.limit:
                    return await self._refuse(scope, receive, send)
            elif scope["method"] in ("POST", "PUT", "PATCH"):
                chunks, size = [], 0
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        break  # the client went away
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.limit:
                        return await self._refuse(scope, receive, send)
                    if not message.get("more_body", False):
                        break
                body = b"".join(chunks)
                sent = False

                async def replay():
                    nonlocal sent
                    if sent:
                        return await receive()
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}

                return await self.app(scope, replay, send)
        await self.app(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = _error(413, f"request body is larger than {self.limit} bytes", code="request_too_large")
        response.headers["Connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


def _union_tag(part) -> bool:
    """Whether a part of pydantic's error location names a member of a union (`str`, `list[str]`), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none")
                                      or not part.replace("_", "a").isalnum())


def validation_error(errors: list[dict]) -> JSONResponse:
    """A 400 naming up to five problems of a request body, each with where it is."""
    if errors and errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error", "")
        return _error(400, f"request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    problems, params = [], []
    for err in errors[:5]:
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ())
                        if p != "body" and not _union_tag(p))
        params.append(param.lstrip(".") or None)
        if err.get("type") == "extra_forbidden":
            message = "unknown field: this server does not know it (docs/SERVING.md lists every field)"
        elif err.get("type") == "model_attributes_type" and not params[-1]:
            message = "the request body must be a JSON object"
        else:
            message = err.get("msg")
        problems.append(f"{params[-1] or 'request body'}: {message}")
    return _error(400, "; ".join(problems), code="invalid_request", param=params[0] if params else None)


MAX_JSON_STRUCTURES = 20_000
"""Most `{` and `[` a request body may hold (counted in its bytes, before parsing). A conversation that
fits a context of a few thousand tokens holds far fewer; parsing a million of them took 9 s here."""


def parse_request(body: bytes, content_type: str) -> ChatCompletionRequest | JSONResponse:
    """The request of a body, or the 400 that says what is wrong with it (in a worker thread: a body of
    megabytes takes a while to parse)."""
    kind = content_type.split(";")[0].strip().lower()
    if kind and kind != "application/json" and not kind.endswith("+json"):
        return _error(400, f"the request body must be JSON sent with Content-Type: application/json (got {kind})",
                      code="invalid_content_type")
    structures = body.count(b"{") + body.count(b"[")
    if structures > MAX_JSON_STRUCTURES:  # parsing a million small objects holds the GIL for seconds
        return _error(400, f"the request body has {structures} JSON objects and arrays; at most "
                      f"{MAX_JSON_STRUCTURES} are read", code="request_too_complex")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        return _error(400, f"request body is not valid JSON: {type(err).__name__}: {str(err)[:200]}",
                      code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        return validation_error(err.errors(include_url=False))
    except RecursionError:
        return _error(400, "request body is nested too deeply", code="invalid_request")


@dataclass
class Prepared:
    """A request ready for the engine: its prompt, sampling settings and structured-output matcher."""

    prompt: Prompt
    sampling: SamplingParams
    matcher: object = None


def create_app(chat: ChatModel, settings: ServerSettings | None = None) -> FastAPI:
    """The server for one loaded model. The batching engine starts and stops with the app."""
    settings = settings or ServerSettings()
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        chat.engine.warm_up()  # allocate the cache and record the graphs before the first request
        app.state.mailbox = Mailbox(asyncio.get_running_loop())
        # A few threads decode images and tokenize: with the default pool's 40 they contend for the GIL
        # with the engine's thread, whose steps then start late (seen: p90 of a 4 ms step at 8 ms).
        app.state.prepare = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="crossvlm-prepare")
        app.state.stats = {"prepared": 0, "prepare_s": 0.0}  # requests whose images and text were prepared, and the time
        app.state.metrics = Metrics(settings.model_name)
        yield
        app.state.prepare.shutdown(cancel_futures=True)
        chat.close()

    app = FastAPI(title="crossvlm", lifespan=lifespan, docs_url=None, redoc_url=None)

    # -- errors in OpenAI's shape ---------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(_request, exc: InputError):
        return _error(400, str(exc), code=exc.code, param=exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        return validation_error(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")

    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)

    async def authorize(request: Request) -> None:  # async: no hop through a worker thread
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                           "authentication_error", "invalid_api_key")

    # -- routes ---------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return page

    @app.get("/health")
    async def health():
        engine = chat.engine
        return {"status": "ok", "model": settings.model_name, "server": dict(app.state.stats),
                "engine": {"slots": engine.slots, "running": engine.running(), "waiting": engine.waiting(),
                           "max_len": engine.max_len, "kv_blocks": engine.blocks.blocks - 1,
                           "kv_blocks_free": engine.blocks.available, "kv_block_size": engine.blocks.block_size,
                           **engine.stats}}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "crossvlm"}]}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(app.state.metrics.render(chat.engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    vocab = chat.model.config.text_config.vocab_size

    def prepare(req: ChatCompletionRequest) -> Prepared:
        """Check the request against the model, decode images and tokenize (in a worker thread: this may
        download or decode images). What can be refused from sizes alone is refused before any work."""
        chars = sum(len(m.content) if isinstance(m.content, str) else
                    sum(len(part.text) for part in m.content or () if part.type == "text") for m in req.messages)
        if chars > chat.max_prompt_chars:
            raise InputError(f"the messages' {chars} characters need more tokens than the context's "
                             f"{chat.context_length}; shorten them", "context_length_exceeded", "messages")
        images = sum(part.type == "image_url" for m in req.messages if isinstance(m.content, list) for part in m.content)
        if images * chat.processor.num_image_tokens >= chat.context_length:
            raise InputError(f"{images} images take {images * chat.processor.num_image_tokens} tokens, more than the "
                             f"context's {chat.context_length}", "context_length_exceeded", "messages")
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            if not key.strip().isdigit() or int(key) >= vocab:
                raise InputError(f"logit_bias: {key!r} is not a token id (0 to {vocab - 1})", "invalid_request",
                                 "logit_bias")
            if not -100 <= value <= 100:
                raise InputError(f"logit_bias[{key}]: a bias must be in [-100, 100], got {value}", "invalid_request",
                                 "logit_bias")
            bias[int(key)] = value
        schema = req.json_schema()
        if schema is not None and (req.min_tokens or req.ignore_eos):
            raise InputError("response_format ends the answer with the JSON document: it cannot go with min_tokens "
                             "or ignore_eos", "invalid_request", "response_format")
        messages = []
        for m, message in enumerate(req.messages):
            role = "system" if message.role == "developer" else message.role
            content = message.content
            if isinstance(content, list):
                content = [
                    {"type": "text", "text": part.text} if part.type == "text" else
                    {"type": "image", "image": image_from_url(part.image_url.url, settings.images,
                                                              f"messages[{m}].content[{p}].image_url", chat.draft_size)}
                    for p, part in enumerate(content)
                ]
            messages.append({"role": role, "content": content or ""})
        thinking = settings.thinking and schema is None  # a schema turns the server's default off, not a request's own choice
        if req.chat_template_kwargs and req.chat_template_kwargs.enable_thinking is not None:
            thinking = req.chat_template_kwargs.enable_thinking
        prompt = chat.prompt(messages, enable_thinking=thinking)
        room = chat.context_length - len(prompt.input_ids)
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > room:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise InputError(f"this model's context is {chat.context_length} tokens; the messages take "
                             f"{len(prompt.input_ids)} and {param} asks for {asked}: at most {room} are left",
                             "context_length_exceeded", param)
        defaults = SamplingParams()
        try:
            sampling = SamplingParams(
                max_new_tokens=asked or min(settings.default_max_tokens, room),
                temperature=defaults.temperature if req.temperature is None else req.temperature,
                top_p=req.top_p or defaults.top_p,
                top_k=defaults.top_k if req.top_k is None else max(req.top_k, 0),
                repetition_penalty=req.repetition_penalty or defaults.repetition_penalty,
                frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
                logit_bias=bias or None, json_schema=schema,
                stop=tuple(req.stop_list()), seed=req.seed, min_tokens=req.min_tokens or 0, ignore_eos=req.ignore_eos,
            )
        except CrossVLMError as err:  # (a combination the request's schema lets through)
            raise InputError(str(err), "invalid_request") from None
        return Prepared(prompt, sampling, chat.matcher(sampling, thinking))

    def refuse(status: int, response: JSONResponse) -> JSONResponse:
        app.state.metrics.refused.labels(settings.model_name, str(status)).inc()
        return response

    # The body is parsed in a worker thread (`parse_request`), not by FastAPI: its schema is given here.
    body_schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    body_defs = body_schema.pop("$defs", {})

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema.setdefault("components", {}).setdefault("schemas", {}).update(body_defs)
        return app.openapi_schema

    app.openapi = openapi

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)],
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}})
    async def chat_completions(request: Request):
        loop = asyncio.get_running_loop()
        body = await request.body()
        start = time.perf_counter()
        prepare_pool = request.app.state.prepare
        req = await loop.run_in_executor(prepare_pool, parse_request, body, request.headers.get("content-type", ""))
        if isinstance(req, JSONResponse):
            return refuse(400, req)
        refusals = req.refusals()
        if refusals:
            param, message = refusals[0]
            return refuse(400, _error(400, message, code="unsupported_parameter", param=param))
        if req.model is not None and req.model != settings.model_name:
            return refuse(404, _error(404, f"the model {req.model!r} does not exist here: this server serves "
                                      f"{settings.model_name!r} (GET /v1/models)", code="model_not_found", param="model"))
        try:
            prepared = await loop.run_in_executor(prepare_pool, prepare, req)
        except InputError as err:
            return refuse(400, _error(400, str(err), code=err.code, param=err.param))
        stats = request.app.state.stats
        stats["prepared"] += 1
        stats["prepare_s"] += time.perf_counter() - start
        ids = ResponseIds(req.model or settings.model_name)
        try:
            job = Job(chat, request.app.state.mailbox, prepared, req.stream, settings.max_waiting)
        except QueueFull as err:
            app.state.metrics.refused.labels(settings.model_name, "429").inc()
            raise APIError(429, f"the server is busy ({err}); retry later", "rate_limit_error", "server_busy",
                           headers={"Retry-After": str(settings.retry_after)}) from None
        job.watch(app.state.metrics, start)
        events = job.events()
        try:  # the first event decides between an answer and an error status
            first = await anext(events)
        except GenerationError as err:
            raise _failed(err) from None
        except BaseException:
            job.cancel()
            raise
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(job, first, events, ids, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done = first if isinstance(first, Completion) else None
        try:
            async for event in events:
                done = event
        except GenerationError as err:
            raise _failed(err) from None
        finally:
            if done is None:
                job.cancel()
        return ids.completion(done)

    return app


async def _stream(job: Job, first, events, ids: ResponseIds, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    finished = False

    async def all_events():
        yield first
        async for event in events:
            yield event

    try:
        yield _sse(ids.chunk({"role": "assistant", "content": ""}))
        async for event in all_events():
            if isinstance(event, Completion):
                finished = True
                yield _sse(ids.chunk({}, event.finish_reason))
                if include_usage:
                    yield _sse(ids.chunk({}, usage_=usage(event)))
            else:
                delta = {}
                if event.reasoning:
                    delta["reasoning_content"] = event.reasoning
                if event.text:
                    delta["content"] = event.text
                if delta:
                    yield _sse(ids.chunk(delta))
    except GenerationError as err:  # headers are sent: report in the stream, as OpenAI does
        yield _sse(_failed(err).body)
    finally:
        if not finished:
            job.cancel()  # the client left (or generation failed): stop generating for it
    yield _sse("[DONE]")
