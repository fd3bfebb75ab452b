"""Reading the Ray dashboard's HTTP API (job status) and a node's Prometheus metrics endpoint.

When Ray's token authentication is on (the default after the first `ray.init` in Ray 2.60), the
dashboard answers 401 without `Authorization: Bearer <token>`; the token is read from
$RAY_AUTH_TOKEN or ~/.ray/auth_token when present.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path


def auth_headers() -> dict[str, str]:
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path.home() / ".ray" / "auth_token"
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def http_get(url: str, timeout: float = 10.0) -> bytes:
    request = urllib.request.Request(url, headers=auth_headers())
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def job_status(dashboard_url: str, submission_id: str) -> str:
    """'PENDING' | 'RUNNING' | 'SUCCEEDED' | 'FAILED' | 'STOPPED'."""
    return json.loads(http_get(f"{dashboard_url.rstrip('/')}/api/jobs/{submission_id}"))["status"]


def prometheus_samples(metrics_url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric `name` in a Prometheus text page."""
    out = []
    for line in http_get(metrics_url).decode().splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, labels = head.partition("{")
        if metric != name:
            continue
        pairs = [p.split("=", 1) for p in labels.rstrip("}").split(",") if "=" in p]
        out.append(({k: v.strip('"') for k, v in pairs}, float(value)))
    return out
