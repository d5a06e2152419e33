"""The FastAPI gateway: HTTP API, SSE tailing, auth and admission."""
