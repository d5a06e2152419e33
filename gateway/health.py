"""Liveness, readiness and Prometheus metrics: for load balancers and scrapers, so no key."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from gateway.errors import documented, error_response
from gateway.services import Svc
from tailgate import prometheus

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

QUEUE_DEPTH = Gauge(
    "tailgate_queue_depth",
    "Jobs in the ARQ queue (its sorted set on the queue Redis), read when scraped, at most once a second",
    multiprocess_mode="mostrecent",  # one queue: the process that serves a scrape has just read it
)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=documented(503))
async def readyz(svc: Svc) -> JSONResponse:
    """Both Redis servers answer and the process is not shutting down; else 503 ``not_ready``."""
    if svc.draining:
        return error_response(503, "not_ready", "shutting down")
    try:
        await svc.streams.ping()
        await svc.queue.ping()
    except Exception as exc:  # whatever went wrong, the answer is "not ready"; why goes to the log
        log.warning("not ready: Redis is unreachable: %s", exc)
        return error_response(503, "not_ready", "Redis is unreachable")
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
async def metrics(svc: Svc) -> Response:
    """Prometheus metrics of this gateway (the sum over its processes, with ``--workers``), and the
    queue's depth."""
    QUEUE_DEPTH.set(await svc.admission.queue_depth())
    return Response(generate_latest(prometheus.registry()), media_type=CONTENT_TYPE_LATEST)
