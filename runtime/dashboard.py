"""Reading the Ray dashboard's HTTP API (job status) and a node's Prometheus metrics endpoint.

When Ray's token authentication is on (the default after the first `ray.init` in Ray 2.60), the
dashboard answers 401 without `Authorization: Bearer <token>`; the token is read from
$RAY_AUTH_TOKEN or ~/.ray/auth_token when present.
"""

from __future__ import annotations

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
    """'PENDING' | 'RUNNING' | 'SUCCEEDED' | 'FAILED' | 'STOPPED', from Ray's own job client."""
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(dashboard_url, headers=auth_headers()).get_job_status(submission_id).value)


def prometheus_samples(metrics_url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric `name` in a Prometheus text page (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(http_get(metrics_url).decode())
            for sample in family.samples if sample.name == name]
