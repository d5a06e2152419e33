"""Schemathesis against the live gateway's own OpenAPI schema: generated requests of every shape
(with a valid key, so they reach past auth) never get a 5xx, and every answer matches the schema:
its status is declared, its content type too, and its body fits the declared model.

Bounded: ``EXAMPLES`` generated requests per operation. Schemathesis runs here through its Python
API, one Hypothesis run per operation, rather than its pytest plugin."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks

from tests.harness import Stack

EXAMPLES = 40
OPERATIONS = {
    ("POST", "/v1/streams"),
    ("GET", "/v1/streams/{stream_id}"),
    ("POST", "/v1/streams/{stream_id}/cancel"),
    ("GET", "/v1/streams/{stream_id}/events"),
    ("POST", "/ask_query"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{response_id}"),
    ("POST", "/v1/responses/{response_id}/cancel"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
}
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


async def test_generated_requests_get_no_5xx_and_answers_match_the_schema(stack: Stack) -> None:
    await asyncio.to_thread(_run, stack)


def _run(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    # Streams that exist, so that generated requests on a stream reach past the 404: one that ran to
    # its end (the session stack has a worker) and one cancelled while queued.
    with httpx.Client(base_url=stack.url, headers=stack.headers, timeout=30) as client:
        done = client.post("/v1/streams", json={"prompt": "schema [mock:tokens=3]"}).json()["id"]
        with client.stream("GET", f"/v1/streams/{done}/events") as r:
            r.read()
        cancelled = client.post("/v1/streams", json={"prompt": "schema"}).json()["id"]
        client.post(f"/v1/streams/{cancelled}/cancel")
        response = client.post("/v1/responses", json={"input": "schema [mock:tokens=3]", "background": True})
    real_ids = st.sampled_from([done, cancelled, None])
    real_responses = st.sampled_from([response.json()["id"], None])
    paths = schema.raw_schema["paths"]
    assert {(m.upper(), p) for p, ms in paths.items() for m in ms} == OPERATIONS
    for method, path in sorted(OPERATIONS):
        operation = schema[path][method]

        @given(case=operation.as_strategy(), real_id=real_ids, real_response=real_responses)
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def conforms(case: Any, real_id: str | None, real_response: str | None) -> None:
            if real_id is not None and "stream_id" in (case.path_parameters or {}):
                case.path_parameters["stream_id"] = real_id
            if real_response is not None and "response_id" in (case.path_parameters or {}):
                case.path_parameters["response_id"] = real_response
            case.call_and_validate(headers=stack.headers, checks=CHECKS, timeout=30)

        conforms()
