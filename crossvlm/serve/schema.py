"""Requests of `POST /v1/chat/completions` (OpenAI's format) and the bodies the server answers with."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    # An unknown field is refused (400 naming it), never ignored: docs/SERVING.md lists every field.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None
    """Not applicable: the model sees every image at its vision tower's size."""


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]

TOOLS_REFUSED = ("this server does not do tool (function) calling: send the request without tools, tool_choice, "
                 "functions, function_call and tool messages")


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    """Not applicable: the chat template has no place for a participant's name."""
    reasoning_content: str | None = None
    """Not applicable: an earlier answer's reasoning is dropped by the chat template."""
    refusal: str | None = None
    """Not applicable (an earlier answer's refusal text)."""
    tool_calls: list | None = None
    tool_call_id: str | None = None
    function_call: dict | None = None
    audio: dict | None = None


class StreamOptions(_Model):
    include_usage: bool = False
    include_obfuscation: bool | None = None
    """Not applicable: chunks carry no obfuscation padding."""


class ChatTemplateKwargs(_Model):
    enable_thinking: bool | None = None


class JsonSchemaFormat(_Model):
    name: str = Field("schema", max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    """Output always follows the schema, strict or not."""


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


INT64 = 2**63


class ChatCompletionRequest(_Model):
    """Every field of OpenAI's chat completion request (docs/SERVING.md says what each does here) and
    vLLM's sampling extras; `refusals` names the ones asked for that this server cannot do."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=10_000)
    max_tokens: int | None = Field(None, ge=1, le=INT64 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=2**31)
    """vLLM's: 0 or -1 turns top-k off."""
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)
    stop: str | Annotated[list[Annotated[str, Field(max_length=1000)]], Field(max_length=16)] | None = Field(
        None, max_length=1000)
    seed: int | None = Field(None, ge=-INT64, le=INT64 - 1)
    min_tokens: int | None = Field(None, ge=0, le=2**31)
    """vLLM's: no end of turn (and no stop string) before this many tokens."""
    ignore_eos: bool = False
    """vLLM's: generate past end-of-turn tokens until the token budget is spent (benchmark clients send it)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=2**31)
    response_format: ResponseFormat | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    """vLLM's way to switch thinking: `{"enable_thinking": true}`."""
    # -- refused when they ask for something (`refusals`) --
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    parallel_tool_calls: bool | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    web_search_options: dict | None = None
    verbosity: str | None = None
    store: bool | None = None
    # -- not applicable: accepted, no effect (docs/SERVING.md says why) --
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def json_schema(self) -> dict | None:
        """The schema the answer must follow (None: free text)."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "object"}
        return fmt.json_schema.schema_ if fmt.json_schema and fmt.json_schema.schema_ is not None else {}

    def refusals(self) -> list[tuple[str, str]]:
        """(param, message) for each feature asked for that this server does not have."""
        out = []
        tool_messages = [m for m, msg in enumerate(self.messages)
                         if msg.role in ("tool", "function") or msg.tool_calls or msg.function_call or msg.tool_call_id]
        if self.tools or self.functions or self.function_call not in (None, "none") or tool_messages \
                or self.tool_choice not in (None, "none"):
            param = next(k for k, v in (("tools", self.tools), ("functions", self.functions),
                                        ("function_call", self.function_call not in (None, "none")),
                                        ("tool_choice", self.tool_choice not in (None, "none")),
                                        (f"messages[{tool_messages[0] if tool_messages else 0}]", True)) if v)
            out.append((param, TOOLS_REFUSED))
        if self.n not in (None, 1):
            out.append(("n", f"n: this server gives one choice per request, not {self.n}: send n separate requests"))
        if self.logprobs or self.top_logprobs:
            out.append(("logprobs" if self.logprobs else "top_logprobs",
                        "logprobs and top_logprobs are not supported by this server: send the request without them"))
        if self.response_format and self.response_format.type == "json_schema" and (
                self.response_format.json_schema is None or self.response_format.json_schema.schema_ is None):
            out.append(("response_format.json_schema", "response_format of type json_schema needs "
                        "`json_schema: {\"name\": ..., \"schema\": {...}}`"))
        for name, why in (("audio", "audio output"), ("prediction", "predicted outputs"),
                          ("web_search_options", "web search"), ("store", "stored completions"),
                          ("reasoning_effort", "reasoning effort (switch thinking with "
                           "chat_template_kwargs.enable_thinking)"), ("verbosity", "a verbosity setting")):
            if getattr(self, name):
                out.append((name, f"{name}: this server has no {why}: send the request without it"))
        if self.stream_options is not None and not self.stream:
            out.append(("stream_options", "stream_options: only with \"stream\": true (as vLLM answers)"))
        if self.modalities and self.modalities != ["text"]:
            out.append(("modalities", "modalities: this server answers with text only (send [\"text\"] or nothing)"))
        for m, msg in enumerate(self.messages):
            if msg.audio:
                out.append((f"messages[{m}].audio", "audio in messages is not supported by this server"))
        if self.min_tokens and (self.max_completion_tokens or self.max_tokens or 0) and \
                self.min_tokens > (self.max_completion_tokens or self.max_tokens):
            out.append(("min_tokens", f"min_tokens ({self.min_tokens}) is larger than the token budget"))
        return out


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(done) -> dict:
    """OpenAI's usage of a `Completion`: tokens in and out, and the prompt's tokens the prefix cache held."""
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


class ResponseIds:
    """The id, creation time and model name every body and chunk of one answer shares."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def completion(self, done) -> dict:
        message = {"role": "assistant", "content": done.text}
        if done.reasoning is not None:
            message["reasoning_content"] = done.reasoning
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": usage(done),
        }

    def chunk(self, delta: dict, finish_reason: str | None = None, usage_: dict | None = None) -> dict:
        choices = [] if usage_ is not None else [
            {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}
        if usage_ is not None:
            body["usage"] = usage_
        return body
