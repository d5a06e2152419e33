"""The Responses API's view of a stream: its stored events folded into OpenAI's Responses events and
into the response object.

The fold is a function of the stored events alone, the same on every replica and at every re-read,
so each event's ``sequence_number`` is too, and ``starting_after=N`` resumes exactly after event N:
the reader folds the stream from its start and writes only what comes after N. Stored events become
(``sequence_number`` counts from 0, contiguous):

    queued               response.created, response.queued             status queued
    started (the first)  response.in_progress                          status in_progress
    delta (the first)    response.output_item.added, response.content_part.added, then as below
    delta                response.output_text.delta
    done                 response.output_text.done, response.content_part.done,
                         response.output_item.done, then response.completed, or
                         response.incomplete (finish reason `length` or `content_filter`)
    error                response.failed
    cancelled            nothing: OpenAI's stream has no event for it; the stream ends, and the
                         response's status is `cancelled`
    reset, before text   nothing: the next attempt's text is the first anyone sees
    reset, after text    error (the openai SDKs raise it), then response.failed; the text is void,
                         so the failed response has no output, and nothing after the reset counts

Deliberate oddity: the ``error`` event carries ``code``, ``message`` and ``param`` at the top level,
as OpenAI documents the event, and again nested under ``error``, as OpenAI's servers send it; the
SDKs raise ``APIError`` only for the nested form.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gateway.openai_wire import entry_seconds, reset_message, seconds, stream_error
from tailgate.events import Entry, dumps

# Response.error.code is one of OpenAI's; tailgate's own code goes into the message.
_ERROR_CODES = {"upstream_rate_limited": "rate_limit_exceeded"}
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_id(stream_id: str) -> str:
    return f"resp_{stream_id}"


class ResponseView:
    """One stream as a response. :meth:`apply` each stored event in order; it answers the Responses
    events that event makes. :meth:`snapshot` is the response object as it stands."""

    def __init__(self, stream_id: str, meta: dict[str, str]) -> None:
        self.stream_id = stream_id
        self.id = response_id(stream_id)
        self.status = "queued"
        self.finished = False  # the Responses stream is over (its stored stream may go on)
        self.seq = -1
        self._params: dict[str, Any] = json.loads(meta.get("response") or "{}")
        self._created = seconds(meta.get("created_at"))
        self._model = meta.get("model", "")
        self._item_id = f"msg_{stream_id}"
        self._item: str | None = None  # the output message's status, once it exists
        self._text: list[str] = []
        self._usage: dict[str, Any] | None = None
        self._error: dict[str, str] | None = None
        self._incomplete: dict[str, str] | None = None
        self._completed_at: int | None = None

    def apply(self, e: Entry) -> list[dict[str, Any]]:
        if self.finished:
            return []
        match e.type:
            case "queued":
                return [self._lifecycle("response.created"), self._lifecycle("response.queued")]
            case "started" if self.status == "queued":
                self.status = "in_progress"
                return [self._lifecycle("response.in_progress")]
            case "delta":
                text = json.loads(e.data)["text"]
                out = self._open_item()
                self._text.append(text)
                return [
                    *out,
                    self._event("response.output_text.delta", **self._at(), delta=text, logprobs=[]),
                ]
            case "reset" if self._item is not None:
                self._end("failed")
                self._item, self._text = None, []  # void: never shown, never spliced to what follows
                message = reset_message(self.stream_id)
                self._error = {"code": "server_error", "message": message}
                error = stream_error("stream_reset", message)
                fields = {k: error[k] for k in ("code", "message", "param")}
                return [self._event("error", **fields, error=error), self._lifecycle("response.failed")]
            case "done":
                data = json.loads(e.data)
                out = [*self._open_item(), *self._close_item(data["finish_reason"])]
                self._usage = usage(data.get("usage"))
                self._completed_at = entry_seconds(e)
                if self._incomplete is not None:
                    self._end("incomplete")
                    return [*out, self._lifecycle("response.incomplete")]
                self._end("completed")
                return [*out, self._lifecycle("response.completed")]
            case "error":
                data = json.loads(e.data)
                code = _ERROR_CODES.get(data["code"], "server_error")
                self._error = {"code": code, "message": f"{data['message']} ({data['code']})"}
                self._end("failed")
                return [self._lifecycle("response.failed")]
            case "cancelled":
                self._usage = usage(json.loads(e.data).get("usage"))
                self._end("cancelled")
        return []

    def snapshot(self) -> dict[str, Any]:
        p = self._params
        item = self._output_item()
        return {
            "id": self.id,
            "object": "response",
            "created_at": self._created,
            "status": self.status,
            "background": p.get("background", True),
            "completed_at": self._completed_at,
            "error": self._error,
            "incomplete_details": self._incomplete,
            "instructions": p.get("instructions"),
            "max_output_tokens": p.get("max_output_tokens"),
            "metadata": p.get("metadata") or {},
            "model": self._model,
            "output": [item] if item is not None else [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "store": True,
            "temperature": p.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": p.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": self._usage,
            "user": p.get("user"),
        }

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, **fields, "sequence_number": self.seq}

    def _lifecycle(self, kind: str) -> dict[str, Any]:
        return self._event(kind, response=self.snapshot())

    def _end(self, status: str) -> None:
        self.status = status
        self.finished = True
        if self._item == "in_progress":
            self._item = "incomplete"

    def _at(self) -> dict[str, Any]:
        return {"item_id": self._item_id, "output_index": 0, "content_index": 0}

    def _part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": "".join(self._text), "annotations": [], "logprobs": []}

    def _output_item(self, content: bool = True) -> dict[str, Any] | None:
        if self._item is None:
            return None
        return {
            "id": self._item_id,
            "type": "message",
            "status": self._item,
            "role": "assistant",
            "content": [self._part()] if content else [],
        }

    def _open_item(self) -> list[dict[str, Any]]:
        if self._item is not None:
            return []
        self._item = "in_progress"
        return [
            self._event("response.output_item.added", output_index=0, item=self._output_item(content=False)),
            self._event("response.content_part.added", **self._at(), part=self._part()),
        ]

    def _close_item(self, finish_reason: str) -> list[dict[str, Any]]:
        reason = _INCOMPLETE.get(finish_reason)
        self._incomplete = {"reason": reason} if reason else None
        self._item = "incomplete" if reason else "completed"
        text = "".join(self._text)
        return [
            self._event("response.output_text.done", **self._at(), text=text, logprobs=[]),
            self._event("response.content_part.done", **self._at(), part=self._part()),
            self._event("response.output_item.done", output_index=0, item=self._output_item()),
        ]


def usage(u: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat Completions' usage as the Responses API counts it."""
    if not u:
        return None
    read, wrote = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": read,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": wrote,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": int(u.get("total_tokens") or read + wrote),
    }


class ResponseFrames:
    """A :class:`ResponseView` on the wire: ``event:`` and ``data:`` as OpenAI sends them, from the
    event after ``sequence_number`` ``after`` on."""

    def __init__(self, view: ResponseView, after: int) -> None:
        self.view = view
        self._after = after

    @property
    def finished(self) -> bool:
        return self.view.finished

    def __call__(self, entries: Sequence[Entry]) -> bytes:
        out = []
        for e in entries:
            for event in self.view.apply(e):
                if event["sequence_number"] > self._after:
                    out.append(f"event: {event['type']}\ndata: {dumps(event)}\n\n")
        return "".join(out).encode()
