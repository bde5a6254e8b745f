"""Requests of `POST /v1/chat/completions` (OpenAI's format) and the bodies the server answers with."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    # Fields OpenAI clients may add that crossvlm does not use (user, metadata, ...) are ignored.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: str | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatTemplateKwargs(_Model):
    enable_thinking: bool | None = None


class ChatCompletionRequest(_Model):
    """The fields crossvlm honours; `n`, `logprobs` and `tools` are refused rather than ignored."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: int | None = Field(None, ge=0)
    """vLLM's: no end of turn (and no stop string) before this many tokens."""
    ignore_eos: bool = False
    """vLLM's: generate past end-of-turn tokens until the token budget is spent (benchmark clients send it)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    logprobs: Literal[False] | None = None
    tools: Annotated[list, Field(max_length=0)] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    """vLLM's way to switch thinking: `{"enable_thinking": true}`."""

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


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
