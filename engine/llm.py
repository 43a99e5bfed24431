"""LLM providers: an interface, a deterministic local provider, an OpenAI-compatible adapter."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from flowscope.engine.propagation import inject_headers


@dataclass(frozen=True)
class LlmRequest:
    model: str
    messages: list[dict[str, str]]
    max_tokens: int = 256
    temperature: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LlmChunk:
    text: str = ""
    # Set on the final chunk only.
    input_tokens: int | None = None
    output_tokens: int | None = None


class LlmProvider(Protocol):
    name: str

    def stream(self, request: LlmRequest) -> AsyncIterator[LlmChunk]: ...


_WORDS = [
    "the",
    "workflow",
    "ran",
    "each",
    "node",
    "in",
    "order",
    "and",
    "the",
    "results",
    "agree",
    "with",
    "the",
    "plan",
    "so",
    "the",
    "answer",
    "is",
    "ready",
    "tools",
    "returned",
    "data",
    "quickly",
    "while",
    "retries",
    "handled",
    "one",
    "flaky",
    "dependency",
    "cleanly",
]


class LocalProvider:
    """Deterministic provider: the same request always yields the same tokens.

    Lets demos and tests exercise streaming, time to first token and token
    usage without a network or a model.
    """

    name = "local"

    def __init__(self, token_delay_s: float = 0.0, first_token_delay_s: float = 0.0) -> None:
        self.token_delay_s = token_delay_s
        self.first_token_delay_s = first_token_delay_s

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmChunk]:
        prompt = " ".join(m.get("content", "") for m in request.messages)
        digest = hashlib.sha256(f"{request.model}\n{prompt}".encode()).digest()
        count = min(request.max_tokens, 8 + digest[0] % 24)
        input_tokens = max(1, len(prompt.split()))
        if self.first_token_delay_s:
            await asyncio.sleep(self.first_token_delay_s)
        for i in range(count):
            if i and self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            word = _WORDS[(digest[i % len(digest)] + i) % len(_WORDS)]
            yield LlmChunk(text=word if i == 0 else " " + word)
        yield LlmChunk(input_tokens=input_tokens, output_tokens=count)


class OpenAICompatibleProvider:
    """Chat Completions over HTTP with server-sent-event streaming (OpenAI, vLLM, Ollama…)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        name: str = "openai",
        timeout_s: float = 60.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.name = name
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._client = client

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmChunk]:
        headers = {"content-type": "application/json"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        inject_headers(headers)
        payload = {
            "model": request.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            **request.extra,
        }
        client = self._client or httpx.AsyncClient(timeout=self._timeout_s)
        try:
            async with client.stream(
                "POST", f"{self._base_url}/chat/completions", json=payload, headers=headers
            ) as response:
                if response.status_code >= 400:
                    body = (await response.aread()).decode(errors="replace")[:500]
                    raise LlmProviderError(f"{self.name} answered HTTP {response.status_code}: {body}")
                async for chunk in _parse_sse(response):
                    yield chunk
        finally:
            if self._client is None:
                await client.aclose()


class LlmProviderError(RuntimeError):
    pass


async def _parse_sse(response: httpx.Response) -> AsyncIterator[LlmChunk]:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            message = json.loads(data)
        except json.JSONDecodeError as exc:
            raise LlmProviderError(f"malformed stream chunk: {data[:200]!r}") from exc
        for choice in message.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                yield LlmChunk(text=text)
        usage = message.get("usage")
        if usage:
            yield LlmChunk(
                input_tokens=int(usage.get("prompt_tokens", 0)),
                output_tokens=int(usage.get("completion_tokens", 0)),
            )
