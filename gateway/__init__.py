"""The FastAPI gateway: HTTP API, SSE tailing, auth and admission.

- ``app``: ``create_app``, which wires lifespan, middleware, error handlers and the routers.
- Routers, one per surface: ``native`` (``/v1/streams``), ``tutorial`` (``/ask_query``),
  ``health`` (``/healthz``, ``/readyz``, ``/metrics``).
- Shared by the surfaces: ``services`` (Redis clients and what is built on them), ``dependencies``
  (the caller, the stream it names, the resume cursor), ``creation`` (starting a stream), ``sse``
  (wire formats and the streaming response), ``hub`` (fan-out from Redis to readers).
- Beneath: ``auth`` (keys and read tokens), ``admission`` (limits), ``errors`` (the error shape),
  ``server`` (uvicorn with an ordered shutdown).
"""
