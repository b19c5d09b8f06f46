"""Prometheus metrics of one service, in a registry of its own.

Each app gets a :class:`ServiceMetrics` with its own ``CollectorRegistry`` (not the
process-global default), so several services in one test process never collide. Names and
labels follow ``docs/interfaces.md``; all are prefixed ``collafuse_``.

GPU gauges come from NVML at scrape time. Where NVML or a GPU is missing the only GPU series
is ``collafuse_gpu_available 0``: a clean absence, never an error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "GpuCollector", "ServiceMetrics"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STEP_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class GpuCollector(Collector):
    """GPU utilisation, memory and power per device through NVML, read at scrape time.

    NVML is initialised once, on the first scrape; if that fails (no driver, no GPU) every
    later scrape reports ``collafuse_gpu_available 0`` and nothing else.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: list[Any] | None = None  # None: not tried yet
        self._nvml: Any = None

    def _init(self) -> list[Any]:
        if self._handles is not None:
            return self._handles
        self._handles = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
            log.info("no GPU metrics: NVML unavailable (%s)", exc)
            self._handles = []
        return self._handles

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            handles = self._init()
            available = GaugeMetricFamily(
                "collafuse_gpu_available", "1 when NVML found a GPU, else 0"
            )
            available.add_metric([], 1.0 if handles else 0.0)
            yield available
            if not handles:
                return
            util = GaugeMetricFamily(
                "collafuse_gpu_utilization_ratio", "GPU busy fraction (0-1)", labels=["gpu"]
            )
            mem = GaugeMetricFamily(
                "collafuse_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"]
            )
            power = GaugeMetricFamily("collafuse_gpu_power_watts", "GPU power draw", labels=["gpu"])
            nv = self._nvml
            for i, handle in enumerate(handles):
                try:
                    util.add_metric([str(i)], nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
                    mem.add_metric([str(i)], float(nv.nvmlDeviceGetMemoryInfo(handle).used))
                    power.add_metric([str(i)], nv.nvmlDeviceGetPowerUsage(handle) / 1000)
                except Exception as exc:  # a device that stops answering: skip it
                    log.warning("NVML read of GPU %d failed: %s", i, exc)
            yield util
            yield mem
            yield power


class ServiceMetrics:
    """Every ``collafuse_*`` metric of one service, registered in a private registry.

    All services expose the same families (a labelled family with no samples yet prints
    nothing), so one dashboard reads them all; ``collafuse_sample_batch_size`` has no labels
    and is only registered where batching happens (``batching=True``).
    """

    def __init__(self, service: str, *, batching: bool = False, gpu: bool = True) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_latency = Histogram(
            "collafuse_http_request_duration_seconds",
            "HTTP request latency by route",
            ["service", "route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sample_requests = Counter(
            "collafuse_sample_requests", "Sample requests answered", ["site"], registry=r
        )
        self.samples = Counter("collafuse_samples", "Samples produced", ["site"], registry=r)
        self.batch_size: Histogram | None = None
        if batching:
            self.batch_size = Histogram(
                "collafuse_sample_batch_size",
                "Samples per shared forward pass batch",
                buckets=BATCH_BUCKETS,
                registry=r,
            )
        self.denoise_step = Histogram(
            "collafuse_denoise_step_seconds",
            "Wall time of one denoising step over a batch",
            ["role"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.train_loss = Gauge("collafuse_train_loss", "Last training loss", ["role"], registry=r)
        self.train_steps = Counter("collafuse_train_steps", "Optimizer steps", ["role"], registry=r)
        self.phase = Gauge(
            "collafuse_phase",
            "1 for the phase a role is in (training, done, failed, ...), 0 for those it left",
            ["role", "phase"],
            registry=r,
        )
        self._phases: dict[str, str] = {}
        self.disclosures = Counter(
            "collafuse_disclosures",
            "Disclosure uploads by outcome (accepted, duplicate, rejected) and reason",
            ["site", "outcome", "reason"],
            registry=r,
        )
        self.bytes_received = Counter(
            "collafuse_bytes_received", "Request body bytes received", ["site"], registry=r
        )
        self.bytes_sent = Counter(
            "collafuse_bytes_sent", "Response body bytes sent", ["site"], registry=r
        )
        self.checkpoint_version = Gauge(
            "collafuse_checkpoint_version", "Checkpoint version in use", ["role"], registry=r
        )
        self.nfe = Counter(
            "collafuse_nfe",
            "Network function evaluations per sample",
            ["site", "role"],
            registry=r,
        )
        self.compute_seconds = Counter(
            "collafuse_compute_seconds", "Compute wall time spent", ["site", "role"], registry=r
        )
        self.privacy_epsilon = Gauge(
            "collafuse_privacy_epsilon",
            "Exact Gaussian-DP epsilon of the disclosures (delta 1e-5)",
            ["site", "kind"],
            registry=r,
        )
        if gpu:
            r.register(GpuCollector())

    def set_phase(self, role: str, phase: str) -> None:
        """Move ``role``'s phase gauge: the old phase to 0, the new one to 1 (alerts can ask
        "is it training?" or "has it failed?" instead of guessing from counters)."""
        old = self._phases.get(role)
        if old is not None and old != phase:
            self.phase.labels(role, old).set(0)
        self.phase.labels(role, phase).set(1)
        self._phases[role] = phase

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class PhaseMetric:
    """A role whose ``phase`` (its ``/v1/status`` phase) is mirrored in ``collafuse_phase``:
    the class sets ``ROLE`` and ``self.metrics`` (a :class:`ServiceMetrics`)."""

    ROLE: str
    metrics: ServiceMetrics
    _phase: str

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase = value
        self.metrics.set_phase(self.ROLE, value)
