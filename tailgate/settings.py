"""Configuration: one typed object per process, read from ``TAILGATE_*`` at the entry point.

The openai SDK reads its own ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL``; they are not duplicated here.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tailgate import sentinel
from tailgate.replication import Replicas


class Settings(BaseSettings):
    # hide_input_in_errors: a bad URL or secret is named in the error, never printed.
    model_config = SettingsConfigDict(env_prefix="TAILGATE_", extra="ignore", hide_input_in_errors=True)

    # Redis. The queue must be a single primary (ARQ does not run on Cluster); streams may live elsewhere.
    # Each URL is redis:// (rediss://, unix://) as redis-py reads it, or a primary that Sentinels
    # watch: redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db], the hosts being
    # the Sentinels and `service` the master name they monitor (tailgate.sentinel); its clients follow
    # the primary through a failover.
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_redis_url: str | None = None
    streams_redis_url: str | None = None
    queue_name: str = "tg:queue"
    # Replicas that must have a write before tailgate acknowledges it (a create's 202, a claim, each
    # append, a cancel): 0 trusts the primary alone (a failover may lose its last writes); n waits
    # for n replicas (Redis WAIT), up to the timeout, and treats a shortfall as an outage
    # (tailgate.replication). Run more than n replicas, or writes stop while one of them is down.
    replica_acks: int = Field(default=0, ge=0)
    replica_ack_timeout_ms: int = Field(default=1000, ge=1)

    # Security. Auth is on unless explicitly turned off (development only).
    auth: bool = True
    api_keys: str = ""  # comma-separated; more keys live in Redis (`tailgate keys add`)
    secret: str = ""  # signs read tokens; empty: a random secret shared by all replicas through Redis
    read_token_ttl_s: int = 3600
    # Comma-separated: read tokens they signed stay valid while you rotate to a new TAILGATE_SECRET.
    previous_secrets: str = ""
    # Keys the HMAC that turns an API key into its owner id; empty: a random one shared through Redis.
    owner_key: str = ""

    # Limits.
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 16384  # request line + headers; more gets 431
    request_timeout_s: float = 15.0  # a request's head and body must arrive within this; else 408
    max_connections: int = 10_000  # open connections per gateway process (~40 KiB each when idle)
    max_sse_per_key: int = 2_000  # open event streams of one key on one gateway process
    rate_limit_per_min: int = 600  # stream creations per key per minute
    max_active_per_key: int = 100  # queued + running streams per key
    max_queued: int = 10_000  # jobs waiting in the queue, all keys together

    # Streams.
    retention_s: int = 24 * 3600
    stream_maxlen: int = 100_000  # events per stream; past it the stream ends with `stream_too_long`
    default_model: str = "gpt-4o-mini"
    models: str = ""  # comma-separated models clients may ask for; empty: any
    max_tokens: int = Field(default=0, ge=0)  # ceiling on a request's max_tokens (sent when absent); 0: none

    # Gateway.
    ping_s: float = 15.0
    send_timeout_s: float = 30.0
    # The `retry:` hint that starts every native event stream: how long a browser waits before it
    # reconnects after a replica dies. 0 sends none (browsers then wait their own default, ~3 s).
    sse_retry_ms: int = Field(default=1000, ge=0)
    cors_origins: str = ""  # comma-separated; empty: no CORS headers
    # Longer than a load balancer's idle timeout (60 s on most), or it reuses a connection we just closed.
    keepalive_s: int = 75
    drain_s: float = 5.0  # on SIGTERM: readiness fails this long before SSE readers are sent elsewhere
    # Gateway processes on the one port (`tailgate gateway --workers N` sets it too): with N > 1 a
    # supervisor (tailgate.supervisor) runs N, sharing one listening socket. Each has its own Redis
    # pools, hub subscription and the per-process limits above (TAILGATE_MAX_CONNECTIONS, ...).
    gateway_workers: int = Field(default=1, ge=1)
    # The demo page (/demo) and its keyless create route, which spends the first TAILGATE_API_KEYS key:
    # development only (`tailgate dev` turns it on). See gateway/web.py.
    demo: bool = False

    # Worker.
    concurrency: int = 500  # streams one worker process runs at once (ARQ max_jobs)
    # Worker processes per `tailgate worker` (`--processes N` sets it too): with N > 1 a supervisor
    # (tailgate.supervisor) runs N, each with its own worker id, pools and TAILGATE_CONCURRENCY.
    worker_processes: int = Field(default=1, ge=1)
    poll_delay_s: float = 0.5  # ARQ's queue poll, only a fallback to the wake-up signal
    coalesce_ms: float = 10.0  # how long the worker gathers tokens into one append (worker.publisher)
    job_timeout_s: int = 900
    heartbeat_s: float = 2.0
    takeover_after_s: float = 6.0  # a running stream with no heartbeat for this long is taken over
    max_attempts: int = 3  # attempts per stream (takeovers included) before it ends with `error`
    upstream_connect_timeout_s: float = 10.0
    upstream_idle_timeout_s: float = 60.0  # no chunk for this long ends the attempt
    upstream_max_retries: int = 2  # before the first token, by the openai SDK with backoff
    shutdown_grace_s: float = 25.0
    # Prometheus metrics on http://<any interface>:<port>/metrics; 0: none (`tailgate worker
    # --metrics-port` sets it too). The gateway serves its own on its HTTP port.
    metrics_port: int = Field(default=0, ge=0, le=65535)

    log_format: str = Field(default="json", pattern="^(json|text)$")
    log_level: str = "INFO"

    @field_validator("redis_url", "queue_redis_url", "streams_redis_url")
    @classmethod
    def _sentinel_url_parses(cls, url: str | None) -> str | None:
        if url is not None and sentinel.is_sentinel(url):
            sentinel.parse(url)  # a ValueError that says what is wrong, at startup
        return url

    @property
    def queue_url(self) -> str:
        return self.queue_redis_url or self.redis_url

    @property
    def streams_url(self) -> str:
        return self.streams_redis_url or self.redis_url

    @property
    def one_redis(self) -> bool:
        """The queue and the streams on one Redis: a create enqueues in the same script, and a worker
        claims a job and its stream in one."""
        return self.queue_url == self.streams_url

    @property
    def replicas(self) -> Replicas:
        return Replicas(self.replica_acks, self.replica_ack_timeout_ms)

    @property
    def allowed_models(self) -> frozenset[str]:
        return frozenset(m.strip() for m in self.models.split(",") if m.strip())

    @model_validator(mode="after")
    def _default_model_allowed(self) -> Settings:
        if self.allowed_models and self.default_model not in self.allowed_models:
            raise ValueError(
                f"TAILGATE_DEFAULT_MODEL {self.default_model!r} is not in TAILGATE_MODELS; add it there"
            )
        return self

    @model_validator(mode="after")
    def _demo_has_a_key(self) -> Settings:
        if self.demo and self.auth and not self.static_api_keys:
            raise ValueError(
                "TAILGATE_DEMO creates its streams with the first key of TAILGATE_API_KEYS; set one there"
            )
        return self

    @property
    def static_api_keys(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    @property
    def previous_secret_list(self) -> list[str]:
        return [s.strip() for s in self.previous_secrets.split(",") if s.strip()]
