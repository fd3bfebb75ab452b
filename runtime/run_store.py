"""The run store: one run's durable state in Redis.

Keys, all under `safediff:<run id>:` (the run id is `run.name`):
    config, config_hash   the resolved YAML and its sha256
    status                running | finished | failed
    lease                 owner token, with a TTL renewed by a heartbeat thread; a second job on the
                          same run id is refused while it is held, and a dead holder's lease expires
    step, version, cursor last finished step, policy version, prompt cursor (JSON)
    manifest              list of checkpoints (JSON: path, step, version, sha256 of each file)
    metrics               stream of step records, capped at `store.metrics_maxlen`
    events                stream of what happened (started, checkpoint written, finished, ...), capped at
                          `store.events_maxlen`

Redis unreachable at start is an error naming `store.url`. If it goes away mid-run, training goes on:
each write is queued, in order, and replayed when Redis answers again (retried with exponential backoff
by later writes, and by the lease heartbeat every lease_ttl_s / 3); the outage is logged once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from safediff.common.errors import UserInputError
from safediff.common.secrets import with_password_file, write_private

log = logging.getLogger(__name__)
URL_ENV = "SAFEDIFF_REDIS_URL"
MIN_BACKOFF_S, MAX_BACKOFF_S = 0.5, 30.0
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
# compare-and-delete in one step: a GET then DEL could delete a lease another job took in between
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)


class RunStoreError(UserInputError, RuntimeError):
    """Redis cannot be used as configured (unreachable, wrong password)."""


class Interrupted(Exception):
    """SIGTERM/SIGINT: the run stopped after a checkpoint it can be resumed from."""


class LeaseHeld(RunStoreError):
    """Another live job holds this run id."""


def _connect(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)
    where = url.rsplit("@", 1)[-1]  # never print the password
    try:
        client.ping()
    except redis.AuthenticationError as err:
        raise RunStoreError(f"store.url: Redis at {where} refused the password ({err})") from err
    except redis.ResponseError as err:
        raise RunStoreError(f"store.url: Redis at {where} answered {err} (is a password needed?)") from err
    except _UNAVAILABLE as err:
        raise RunStoreError(f"store.url: cannot reach Redis at {where} ({err})") from err
    return client


class RunStore:
    def __init__(self, url: str, run_id: str, lease_ttl_s: float = 30.0, metrics_maxlen: int = 10_000,
                 events_maxlen: int = 100_000):
        self.client = _connect(url)
        self.run_id, self.lease_ttl_ms = run_id, int(lease_ttl_s * 1000)
        self.metrics_maxlen, self.events_maxlen = metrics_maxlen, events_maxlen
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._pending: deque[list[tuple[str, tuple]]] = deque()
        self._lock = threading.Lock()
        self._outage = False
        self._retry_at, self._backoff_s = 0.0, MIN_BACKOFF_S
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def key(self, name: str) -> str:
        return f"safediff:{self.run_id}:{name}"

    # -- lease ---------------------------------------------------------------------------------

    def acquire_lease(self) -> None:
        if not self.client.set(self.key("lease"), self.owner, nx=True, px=self.lease_ttl_ms):
            holder = self.client.get(self.key("lease"))
            raise LeaseHeld(f"run '{self.run_id}' is already being trained by {holder}; choose another run.name, "
                            f"stop that job, or wait: a dead job's lease expires within "
                            f"{self.lease_ttl_ms / 1000:g} s")
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew_loop, name="run-store-lease", daemon=True)
        self._heartbeat.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_ttl_ms / 3000):
            with contextlib.suppress(*_UNAVAILABLE):
                self.client.eval(_RENEW, 1, self.key("lease"), self.owner, self.lease_ttl_ms)
                self.flush()

    def release_lease(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
            self._heartbeat = None
        with contextlib.suppress(*_UNAVAILABLE):
            self.client.eval(_RELEASE, 1, self.key("lease"), self.owner)

    # -- buffered writes -----------------------------------------------------------------------

    def _write(self, *commands: tuple[str, tuple]) -> None:
        """Queue one atomic group of commands and flush the queue, unless Redis failed recently: then the
        next attempt waits for its backoff (0.5 s doubling to 30 s), so an outage does not slow training."""
        with self._lock:
            self._pending.append(list(commands))
        if time.monotonic() >= self._retry_at:
            self.flush()

    def flush(self) -> bool:
        """Replay queued writes in order now; returns True when nothing is left queued."""
        with self._lock:
            while self._pending:
                group = self._pending[0]
                try:
                    pipe = self.client.pipeline(transaction=True)
                    for name, args in group:
                        getattr(pipe, name)(*args)
                    pipe.execute()
                except _UNAVAILABLE as err:
                    if not self._outage:
                        log.warning("run store: Redis unreachable (%s); buffering writes until it is back", err)
                        self._outage = True
                    self._retry_at = time.monotonic() + self._backoff_s
                    self._backoff_s = min(2 * self._backoff_s, MAX_BACKOFF_S)
                    return False
                self._pending.popleft()
            if self._outage:
                log.warning("run store: Redis is back; buffered writes replayed")
                self._outage = False
            self._retry_at, self._backoff_s = 0.0, MIN_BACKOFF_S
            return True

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    # -- what a run writes ---------------------------------------------------------------------

    def begin(self, config_yaml: str) -> str:
        digest = hashlib.sha256(config_yaml.encode()).hexdigest()
        self._write(("set", (self.key("config"), config_yaml)), ("set", (self.key("config_hash"), digest)),
                    ("set", (self.key("status"), "running")))
        self.event("started", owner=self.owner, config_hash=digest)
        return digest

    def record_step(self, step: int, version: int, cursor: dict, metrics: dict[str, Any]) -> None:
        fields = {k: json.dumps(v) for k, v in metrics.items()}
        self._write(("set", (self.key("step"), step)), ("set", (self.key("version"), version)),
                    ("set", (self.key("cursor"), json.dumps(cursor))),
                    ("xadd", (self.key("metrics"), fields, "*", self.metrics_maxlen, True)))

    def event(self, kind: str, **fields: Any) -> None:
        payload = {"kind": kind, **{k: json.dumps(v) for k, v in fields.items()}}
        self._write(("xadd", (self.key("events"), payload, "*", self.events_maxlen, True)))

    def add_checkpoint(self, path: str | Path, step: int, version: int, files: dict[str, str]) -> None:
        entry = {"path": str(path), "step": step, "version": version, "sha256": files}
        self._write(("rpush", (self.key("manifest"), json.dumps(entry))))
        self.event("checkpoint_written", path=str(path), step=step)

    def start_over(self, moved_to: Path | None) -> None:
        """A fresh start: the previous run's checkpoints (their folder went to `moved_to`), step metrics and position
        are forgotten, so the metrics stream holds this run's steps only; its events stay, as history."""
        self._write(("delete", tuple(self.key(k) for k in ("manifest", "metrics", "step", "version", "cursor"))))
        if moved_to is not None:
            self.event("checkpoints_set_aside", path=str(moved_to))

    def finish(self, status: str) -> None:
        self._write(("set", (self.key("status"), status)))
        self.event(status)

    # -- reading back --------------------------------------------------------------------------

    def manifest(self) -> list[dict]:
        return [json.loads(e) for e in self.client.lrange(self.key("manifest"), 0, -1)]

    def events(self) -> list[dict]:
        return [{"kind": f["kind"], **{k: json.loads(v) for k, v in f.items() if k != "kind"}}
                for _, f in self.client.xrange(self.key("events"))]

    def metrics(self) -> list[dict]:
        return [{k: json.loads(v) for k, v in f.items()} for _, f in self.client.xrange(self.key("metrics"))]

    def status(self) -> str | None:
        return self.client.get(self.key("status"))


def store_url(url: str | None, password_file: Path | None) -> str | None:
    """The run store's URL: store.url, else $SAFEDIFF_REDIS_URL, with store.password_file's password when set;
    None: start the embedded server."""
    url = url or os.environ.get(URL_ENV)
    if password_file is None:
        return url
    if url is None:
        raise UserInputError("store.password_file: set store.url or $SAFEDIFF_REDIS_URL to the server it is the "
                             "password of (the embedded server makes its own)")
    return with_password_file(url, password_file, "store.password_file")


@contextlib.contextmanager
def open_run_store(url: str | None, run_id: str, run_dir: Path, lease_ttl_s: float = 30.0,
                   metrics_maxlen: int = 10_000, events_maxlen: int = 100_000) -> Iterator[RunStore]:
    """The run's store, its lease held. `url` is the resolved one (`store_url`: the config, the environment and the
    password file already applied); with None a real redis-server is started on
    127.0.0.1 with a generated password and its data under <run_dir>/redis; a second job on the same run
    directory attaches to that server (and is refused by the lease) instead of starting another. A server
    left behind by a job that was killed is adopted: the new job uses it and stops it at the end."""
    from safediff.runtime.redis_server import EmbeddedRedis

    server, adopted = None, False
    if url is None:
        info = run_dir / "redis" / "server.json"
        if info.is_file():
            with contextlib.suppress(RunStoreError, ValueError, KeyError):
                known = json.loads(info.read_text())
                _connect(known["url"])
                url = known["url"]
                adopted = not _alive(known.get("pid"))  # its job died (e.g. SIGKILL): this job stops it at the end
        if url is None:
            server = EmbeddedRedis(run_dir / "redis").start()
            url = server.url
        if server is not None or adopted:
            write_private(info, json.dumps({"url": url, "pid": os.getpid()}))  # the embedded server's password
    try:
        store = RunStore(url, run_id, lease_ttl_s, metrics_maxlen, events_maxlen)
        store.acquire_lease()
        try:
            yield store
        finally:
            store.flush()
            store.release_lease()
    finally:
        if server is not None:
            server.stop()
        elif adopted:
            with contextlib.suppress(*_UNAVAILABLE):
                redis.Redis.from_url(url).shutdown()  # writes the append-only file, then exits
        if server is not None or adopted:
            (run_dir / "redis" / "server.json").unlink(missing_ok=True)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
