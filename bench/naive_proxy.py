"""The peer: the original tutorial's direct proxy, kept as it was written there.

FastAPI and the async openai client, no queue, no Redis: ``POST /ask_query {"prompt"}`` opens the
upstream stream inside the request and relays every chunk as a JSON line. Nothing survives a dropped
connection; that is what tailgate adds. The benchmark runs it as its own process:

    uvicorn bench.naive_proxy:app --host 127.0.0.1 --port P

with ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` pointing at the mock upstream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from openai import AsyncOpenAI
from pydantic import BaseModel

MODEL = "gpt-4o-mini"

app = FastAPI(title="naive proxy")
client = AsyncOpenAI()  # OPENAI_API_KEY and OPENAI_BASE_URL from the environment


class Query(BaseModel):
    prompt: str


@app.post("/ask_query")
async def ask_query(query: Query) -> StreamingResponse:
    async def generate() -> AsyncIterator[str]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": query.prompt}], stream=True
        )
        async for chunk in stream:
            content = chunk.choices[0].delta.content if chunk.choices else None
            if content:
                yield json.dumps({"status": "processing", "data": content}) + "\n"
        yield json.dumps({"status": "complete", "data": "Stream finished"}) + "\n"

    return StreamingResponse(generate(), media_type="text/event-stream")
