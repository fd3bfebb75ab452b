"""Run metrics on the Ray dashboard's metrics endpoint (Prometheus format, names prefixed `ray_`).

Every numeric field of a step record becomes a gauge `safediff_<field>` tagged with the run name, so
what `metrics.jsonl` holds is also what the dashboard and Prometheus/Grafana show.
"""

from __future__ import annotations

import re

from ray.util.metrics import Gauge

from safediff.common.metrics import numeric_fields


class RayRunMetrics:
    def __init__(self, run_name: str):
        self.run_name = run_name
        self._gauges: dict[str, Gauge] = {}

    def _gauge(self, field: str) -> Gauge:
        if field not in self._gauges:
            name = "safediff_" + re.sub(r"[^a-zA-Z0-9_]", "_", field)
            gauge = Gauge(name, description=f"safediff step metric '{field}' (see metrics.jsonl)", tag_keys=("run",))
            gauge.set_default_tags({"run": self.run_name})
            self._gauges[field] = gauge
        return self._gauges[field]

    def record(self, record: dict) -> None:
        for field, value in numeric_fields(record).items():
            self._gauge(field).set(value)
