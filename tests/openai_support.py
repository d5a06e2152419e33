"""What the OpenAI-surface tests share: an SDK client for a gateway, what the mock answers for a
conversation, and finding (to kill) the worker that runs a stream."""

from __future__ import annotations

from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam
from redis.asyncio import Redis

from tailgate import keys
from tests.harness import MODEL


def sdk(url: str, api_key: str, **options: Any) -> openai.AsyncOpenAI:
    """The openai SDK, unmodified, pointed at a gateway: only ``base_url`` and the key change."""
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, **options)


async def expected_for(mock_url: str, messages: list[ChatCompletionMessageParam], **kwargs: Any) -> str:
    """What the mock answers for this conversation, asked directly with the real SDK."""
    async with openai.AsyncOpenAI(base_url=f"{mock_url}/v1", api_key="sk-test") as api:
        reply = await api.chat.completions.create(model=MODEL, messages=messages, **kwargs)
    return reply.choices[0].message.content or ""


async def stored(redis_url: str, stream_id: str) -> dict[str, str]:
    """A stream's meta hash, straight from Redis."""
    async with Redis.from_url(redis_url, decode_responses=True) as r:
        meta: dict[str, str] = await r.hgetall(keys.meta(stream_id))
    return meta


async def has_stored(redis_url: str, stream_id: str, seq: int) -> bool:
    """Whether the stream has stored its event ``seq``."""
    return int((await stored(redis_url, stream_id)).get("seq", 0)) >= seq
