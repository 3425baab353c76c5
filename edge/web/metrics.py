"""Prometheus ``/metrics``: appliance health and counts read at scrape time, plus panel HTTP stats.

A custom collector asks the backend at scrape time (no background thread,
nothing added to the inspection path). Each app gets its own registry, so
several panels in one process (tests) never clash.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.web.backend import PanelBackend
from edge.web.system import SystemInfo

_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


class ApplianceCollector(Collector):
    """Reads :meth:`PanelBackend.health`, :meth:`PanelBackend.stats` and system gauges."""

    def __init__(
        self, backend: PanelBackend, system: Callable[[], SystemInfo], started_unix: float
    ) -> None:
        self.backend = backend
        self.system = system
        self.started_unix = started_unix

    def collect(self) -> Iterable[Metric]:
        h = self.backend.health()
        counts = {c: h.extra.get(f"verdicts_{c.lower()}_total") for c in ("OK", "NG", "ERROR")}
        verdicts = CounterMetricFamily(
            "lineinspect_verdicts", "Parts inspected, by verdict", labels=["verdict"]
        )
        if all(v is not None for v in counts.values()):
            # The appliance's own counters since it started: no store query at all.
            for code, value in counts.items():
                verdicts.add_metric([code], float(value or 0.0))
        else:
            st = self.backend.stats(self.started_unix, max(1.0, time.time() - self.started_unix))
            verdicts.add_metric(["OK"], st.ok)
            verdicts.add_metric(["NG"], st.ng)
            verdicts.add_metric(["ERROR"], st.error)
        yield verdicts

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily | None:
            if value is None:
                return None
            return GaugeMetricFamily(f"lineinspect_{name}", doc, value=float(value))

        items = [
            gauge("camera_connected", "1 when the frame source delivers", h.camera_connected),
            gauge("camera_fps", "Frames per second from the source", h.camera_fps),
            gauge("camera_dropped_frames", "Frames dropped since start", h.camera_dropped_frames),
            gauge(
                "backend_latency_p50_ms",
                "Backend inference latency, median",
                h.backend_latency_ms_p50,
            ),
            gauge(
                "backend_latency_p99_ms", "Backend inference latency, p99", h.backend_latency_ms_p99
            ),
            gauge("pipeline_running", "1 when the pipeline runs", h.pipeline_running),
            gauge("threshold", "Image threshold in force", h.threshold),
            gauge(
                "plc_connected",
                "1 when the PLC link is up",
                None if h.plc_connected is None else h.plc_connected,
            ),
            gauge(
                "plc_last_trigger_unixtime", "Time of the last PLC trigger", h.plc_last_trigger_unix
            ),
            gauge(
                "uplink_connected",
                "1 when the MQTT uplink is connected",
                h.uplink_state == "connected",
            ),
            gauge(
                "uplink_outbox_depth", "Records waiting in the uplink outbox", h.uplink_outbox_depth
            ),
        ]
        sysinfo = self.system()
        items += [
            gauge(
                "disk_free_bytes", "Free bytes on the result store's disk", sysinfo.disk_free_bytes
            ),
            gauge(
                "disk_used_ratio", "Used share of the result store's disk", sysinfo.disk_used_ratio
            ),
            gauge("cpu_percent", "CPU use, percent", sysinfo.cpu_percent),
            gauge("cpu_temperature_celsius", "CPU temperature", sysinfo.cpu_temp_c),
            gauge("gpu_temperature_celsius", "GPU temperature", sysinfo.gpu_temp_c),
        ]
        for key, value in sorted(h.extra.items()):
            if key.startswith("verdicts_") and key.endswith("_total"):
                continue
            items.append(gauge(_NAME_RE.sub("_", key), f"Appliance gauge {key}", value))
        for m in items:
            if m is not None:
                yield m


class PanelMetrics:
    """The registry behind ``/metrics`` and the panel's own request metrics."""

    def __init__(self, backend: PanelBackend, system: Callable[[], SystemInfo]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ApplianceCollector(backend, system, time.time()))
        self.requests = Counter(
            "lineinspect_panel_requests",
            "Panel HTTP requests",
            ["method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lineinspect_panel_request_seconds",
            "Panel HTTP request duration",
            ["method"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
