"""One site's work: disclose once, train the private low-noise model, finish hand-offs.

Everything private stays under the site folder (``COLLAFUSE_SITE_DIR``):

- ``disclosure/part-NNNN.safetensors``: the disclosure, written atomically *before* the first
  upload and re-sent byte for byte on every retry or restart (the coordinator is idempotent by
  content hash). Its noise comes from ``secrets.randbits``, never from the shared config's seed.
  ``disclosure/ack.json`` records what the coordinator acknowledged.
- ``model/trainer.pt`` (model, EMA, optimizer, step; resumable) and ``model/ema.safetensors``
  (the EMA weights with the checkpoint metadata);
- ``samples/samples-NNNN.safetensors``: finished samples ``x0 [n, C, H, W]`` (and labels).

The phases run in order in a thread: ``config`` -> ``disclosing`` -> ``training`` -> ``trained``
(then ``sampling`` on request, or automatically with ``samples > 0``) -> ``done``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from collafuse.config import FederationConfig
from collafuse.diffusion import sample_prior
from collafuse.privacy.accountant import account_cut
from collafuse.schedule import make_schedule
from collafuse.services.client import ServiceClient, ServiceError
from collafuse.services.metrics import PhaseMetric, ServiceMetrics
from collafuse.services.settings import place_model
from collafuse.solvers import SolverState
from collafuse.training import (
    SamplerOptions,
    SamplingPlan,
    Trainer,
    atomic_write,
    build_site_model,
    checkpoint_meta,
    make_disclosure,
    make_plan,
    model_to_bytes,
    site_finish,
    train_site,
)
from collafuse.wire import TensorSpec, content_hash, decode_tensors, encode_tensors

__all__ = ["SiteOptions", "SiteRunner"]

log = logging.getLogger(__name__)

ROLE = "site"
CHUNK_STEPS = 25


@dataclass(frozen=True)
class SiteOptions:
    """Knobs of one site runner (CLI flags; defaults from the run config)."""

    site: str
    site_dir: Path
    train_steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.995
    checkpoint_every: int = 500
    time_budget_s: float | None = None
    samples: int = 0  # generate this many after training (0: only on request)
    sample_request: int = 100  # hand-offs per request to the server
    server_steps: int | None = None  # respaced sampling (None: every step)
    site_steps: int | None = None
    # ddpm or a few-step solver (docs/samplers.md); frozen, so one shared default is safe
    sampling: SamplerOptions = field(default_factory=SamplerOptions)
    clip_x0: bool = True
    fp16: bool = False  # disclosure and hand-offs as float16 on the wire
    prefetch: bool = True  # request the next hand-offs while finishing the current ones
    max_upload_images: int = 5000  # images per disclosure part
    seed: int | None = None  # minibatches and sampling (never the disclosure's noise)
    device: str = "cpu"  # where the network runs (resolved: cpu, cuda, cuda:N)


class SiteRunner(PhaseMetric):
    """The site's state machine (see the module docstring)."""

    ROLE = ROLE

    def __init__(
        self,
        fed: FederationConfig,
        images: Tensor,
        labels: Tensor | None,
        coordinator: ServiceClient,
        server: ServiceClient | None,
        options: SiteOptions,
        metrics: ServiceMetrics,
    ) -> None:
        if options.site not in fed.sites:
            raise ValueError(
                f"site {options.site!r} is not in the federation ({', '.join(fed.sites)})"
            )
        if tuple(images.shape[1:]) != fed.image_shape:
            raise ValueError(
                f"site data has images of shape {tuple(images.shape[1:])}, the "
                f"federation expects {fed.image_shape}"
            )
        if len(images) == 0:
            raise ValueError("the site has no training images")
        self.fed, self.images, self.labels = fed, images, labels
        self.coordinator, self.server = coordinator, server
        self.options, self.metrics = options, metrics
        self.schedule = make_schedule(fed.schedule, fed.T)
        self.dir = Path(options.site_dir)
        self.trainer = Trainer(
            place_model(build_site_model(fed), options.device),
            lr=options.lr,
            ema_decay=options.ema_decay,
        )
        seed = options.seed if options.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.phase = "starting"
        self.error: str | None = None
        self.disclosed = False
        self.sample_files: list[str] = []
        self.compute = {"train": 0.0, "sample": 0.0}
        self.nfe = 0
        self.bytes = {
            "uploaded": 0,
            "downloaded": 0,
            "disclosure": 0,
            "sample_request": 0,
            "handoff": 0,
        }
        self.stop = threading.Event()
        coordinator.stop = self.stop  # shutting down cuts the clients' retries short
        if server is not None:
            server.stop = self.stop
        self.trained = threading.Event()
        self._sample_lock = threading.Lock()

    # -- status ------------------------------------------------------------------------------

    def status(self, losses: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "site": self.options.site,
            "phase": self.phase,
            "error": self.error,
            "images": len(self.images),
            "step": self.trainer.step,
            "train_steps": self.options.train_steps,
            "disclosed": self.disclosed,
            "last_loss": self.trainer.losses[-1] if self.trainer.losses else None,
            "samples": self.sample_files,
            "compute_seconds": dict(self.compute),
            "nfe": self.nfe,
            "bytes": dict(self.bytes),
        }
        if losses:
            out["losses"] = list(self.trainer.losses)
        return out

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        try:
            self.coordinator.request(
                "PUT",
                f"/v1/sites/{self.options.site}/status",
                json={"phase": phase, "detail": {"step": self.trainer.step}},
                retry=False,
            )
        except ServiceError as exc:  # status reports are best effort
            log.info("status report failed: %s", exc)

    # -- the whole run -----------------------------------------------------------------------

    def run(self) -> None:
        """Disclose, train, then (optionally) sample; never raises."""
        try:
            self._set_phase("disclosing")
            self.disclose()
            self._set_phase("training")
            self.train()
            self.trained.set()
            self._set_phase("trained")
            if self.options.samples > 0:
                self.generate(self.options.samples)
                self._set_phase("done")
        except _Stopped:
            self.phase = "stopped"
        except Exception as exc:
            if self.stop.is_set():  # shutting down: not a failure
                self.phase = "stopped"
                return
            self.error = str(exc)
            self._set_phase("failed")
            log.error("site %s failed: %s", self.options.site, exc)

    # -- disclosure --------------------------------------------------------------------------

    def _disclosure_parts(self) -> list[Path]:
        """The stored disclosure parts, made (once, atomically) if there are none."""
        folder = self.dir / "disclosure"
        parts = sorted(folder.glob("part-*.safetensors"))
        if parts:
            return parts
        secret = torch.Generator().manual_seed(secrets.randbits(63))  # site-secret noise
        n, k = len(self.images), self.options.max_upload_images
        chunks = [(i, min(i + k, n)) for i in range(0, n, k)]
        for part, (lo, hi) in enumerate(chunks):
            tensors = make_disclosure(self.fed, self.schedule, self.images[lo:hi], secret)
            if self.fed.share_labels and self.labels is not None:
                tensors["y"] = self.labels[lo:hi]
            data = encode_tensors(
                tensors,
                fp16=self.options.fp16,
                metadata={
                    "site": self.options.site,
                    "T": str(self.fed.T),
                    "t_cut": str(self.fed.t_cut),
                    "release": "0",
                    "part": str(part),
                    "parts": str(len(chunks)),
                },
            )
            atomic_write(folder / f"part-{part:04d}.safetensors", data)
        del secret  # the noise is never stored
        return sorted(folder.glob("part-*.safetensors"))

    def disclose(self) -> list[dict[str, Any]]:
        """Upload every stored part (the same bytes on every retry); idempotent. Local-only
        (``t_cut = T``): nothing leaves the site."""
        if self.fed.t_cut == self.fed.T:
            return []
        ack_path = self.dir / "disclosure" / "ack.json"
        acks: dict[str, Any] = json.loads(ack_path.read_text()) if ack_path.exists() else {}
        answers = []
        parts = self._disclosure_parts()
        self.coordinator.request(  # the ledger: how many images, once (idempotent)
            "PUT", f"/v1/sites/{self.options.site}/ledger", json={"images": len(self.images)}
        )
        for path in parts:
            data = path.read_bytes()
            digest = content_hash(data)
            if acks.get(path.name) == digest:
                continue
            answer = self.coordinator.request(
                "POST", f"/v1/sites/{self.options.site}/disclosures", content=data
            ).json()
            self.metrics.bytes_sent.labels(self.options.site).inc(len(data))
            self.bytes["uploaded"] += len(data)
            self.bytes["disclosure"] += len(data)
            acks[path.name] = digest
            atomic_write(ack_path, json.dumps(acks, indent=1).encode())
            answers.append(answer)
        self.disclosed = True
        acct = account_cut(
            self.schedule, self.fed.t_cut, self.fed.pixels, labels_shared=self.fed.share_labels
        )
        for kind, value in (("whole_image", acct.epsilon), ("per_pixel", acct.epsilon_per_pixel)):
            self.metrics.privacy_epsilon.labels(self.options.site, kind).set(
                math.inf if value is None else value
            )
        return answers

    # -- training ----------------------------------------------------------------------------

    def _checkpoint_path(self) -> Path:
        return self.dir / "model" / "trainer.pt"

    def _resume(self) -> None:
        path = self._checkpoint_path()
        if path.exists():
            state = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
            self.trainer.load_state_dict(state)
            self.trainer.losses = [float(x) for x in state.get("losses", [])]
            log.info("site %s resumes at step %d", self.options.site, self.trainer.step)

    def _checkpoint(self) -> None:
        buf = io.BytesIO()
        torch.save({**self.trainer.state_dict(), "losses": self.trainer.losses}, buf)
        atomic_write(self._checkpoint_path(), buf.getvalue())
        meta = checkpoint_meta(
            self.fed, ROLE, self.trainer.step, site=self.options.site, model=self.fed.site_model
        )
        atomic_write(self.dir / "model" / "ema.safetensors", model_to_bytes(self.trainer.ema, meta))
        self.metrics.checkpoint_version.labels(ROLE).set(self.trainer.step)

    def train(self) -> None:
        """Train up to ``train_steps`` (resuming from the site's checkpoint)."""
        self._resume()
        if self.fed.t_cut == 0:
            return  # centralized: the site runs no step
        opts = self.options
        labels = self.labels if self.fed.site_labels else None
        start = time.perf_counter()
        since_ckpt = 0
        while self.trainer.step < opts.train_steps:
            if self.stop.is_set():
                raise _Stopped
            if opts.time_budget_s is not None and time.perf_counter() - start > opts.time_budget_s:
                break
            chunk = min(CHUNK_STEPS, opts.train_steps - self.trainer.step)
            before = self.trainer.compute_seconds
            losses = train_site(
                self.trainer,
                self.fed,
                self.schedule,
                self.images,
                labels,
                chunk,
                opts.batch_size,
                self.generator,
            )
            self.metrics.train_steps.labels(ROLE).inc(len(losses))
            self.metrics.compute_seconds.labels(opts.site, ROLE).inc(
                self.trainer.compute_seconds - before
            )
            self.compute["train"] = self.trainer.compute_seconds
            if losses:
                self.metrics.train_loss.labels(ROLE).set(losses[-1])
            since_ckpt += chunk
            if since_ckpt >= opts.checkpoint_every:
                self._checkpoint()
                since_ckpt = 0
        self._checkpoint()

    # -- sampling ----------------------------------------------------------------------------

    def generate(self, n: int) -> dict[str, Any]:
        """``n`` samples: hand-offs from the server, finished here; saved at the site."""
        if not self.trained.is_set():
            raise RuntimeError(
                f"site {self.options.site} has not finished training (phase {self.phase})"
            )
        with self._sample_lock:
            self.phase = "sampling"
            opts, fed = self.options, self.fed
            plan = self.plan()
            grid = plan.grid
            out: list[tuple[Tensor, Tensor, Tensor | None]] = []
            versions: set[int] = set()
            start = time.perf_counter()
            site_nfe = len([t for t in grid if t < fed.t_cut]) if grid else fed.t_cut
            sizes = [min(opts.sample_request, n - lo) for lo in range(0, n, opts.sample_request)]
            for k, (x_tc, state, version) in zip(sizes, self._handoff_stream(sizes), strict=True):
                versions.add(version)
                labels = self._sample_labels(k)
                t0 = time.perf_counter()
                x0 = site_finish(
                    self.trainer.ema,
                    fed,
                    self.schedule,
                    x_tc,
                    self.generator,
                    labels=labels,
                    clip_x0=opts.clip_x0,
                    plan=plan,
                    state=state,
                )
                seconds = time.perf_counter() - t0
                self.compute["sample"] += seconds
                self.metrics.compute_seconds.labels(opts.site, ROLE).inc(seconds)
                self.metrics.nfe.labels(opts.site, ROLE).inc(k * site_nfe)
                self.nfe += k * site_nfe
                self.metrics.samples.labels(opts.site).inc(k)
                out.append((x0, x_tc, labels))
            tensors_out = {
                "x0": torch.cat([x for x, _, _ in out]),
                "x_tc": torch.cat([h for _, h, _ in out]),
            }  # the server's hand-offs
            if fed.site_labels:
                tensors_out["y"] = torch.cat([y for _, _, y in out if y is not None])
            folder = self.dir / "samples"
            index = len(list(folder.glob("samples-*.safetensors"))) if folder.exists() else 0
            path = folder / f"samples-{index:04d}.safetensors"
            atomic_write(
                path,
                encode_tensors(
                    tensors_out,
                    metadata={
                        "site": opts.site,
                        "server_versions": ",".join(map(str, sorted(versions))),
                    },
                ),
            )
            self.sample_files.append(str(path))
            self.phase = "trained"
            return {
                "n": n,
                "file": str(path),
                "seconds": time.perf_counter() - start,
                "server_versions": sorted(versions),
            }

    def plan(self) -> SamplingPlan:
        """How this site samples (the server is asked for the same server part)."""
        opts = self.options
        return make_plan(self.fed, self.schedule, opts.server_steps, opts.site_steps, opts.sampling)

    def _handoff_stream(self, sizes: list[int]) -> Iterator[tuple[Tensor, SolverState | None, int]]:
        """Hand-offs for requests of ``sizes``, in order. With ``prefetch`` the next request
        is in flight at the server while this site finishes the current one, so server and
        site work overlap and the server sees more requests at once to batch; a failed
        request raises here, in order, exactly as without prefetching. Local-only draws its
        priors from the site's own generator, so it never prefetches."""
        if not self.options.prefetch or self.fed.t_cut == self.fed.T or len(sizes) < 2:
            for k in sizes:
                yield self._handoffs(k)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="handoff-prefetch") as pool:
            pending = pool.submit(self._handoffs, sizes[0])
            for nxt in [*sizes[1:], None]:
                result = pending.result()
                if nxt is not None:
                    pending = pool.submit(self._handoffs, nxt)
                yield result

    def _handoffs(self, k: int) -> tuple[Tensor, SolverState | None, int]:
        """``k`` hand-offs ``x_tc`` from the server, the multistep state when the plan hands
        it over, and the checkpoint version (local-only, ``t_cut = T``: the prior ``x_T``,
        drawn here; nothing is asked of the server)."""
        fed, opts = self.fed, self.options
        if fed.t_cut == fed.T:
            return sample_prior((k, *fed.image_shape), self.generator), None, -1
        if self.server is None:
            raise ValueError("no server URL configured (COLLAFUSE_SERVER_URL)")
        request: dict[str, Any] = {
            "site": opts.site,
            "n": k,
            "fp16": opts.fp16,
            "T": fed.T,
            "t_cut": fed.t_cut,
        }
        if opts.server_steps:
            request["steps"] = opts.server_steps
        if opts.sampling.sampler != "ddpm":
            request.update(dataclasses.asdict(opts.sampling))
        response = self.server.request("POST", "/v1/sample", json=request)
        sent = len(json.dumps(request))
        self.metrics.bytes_received.labels(opts.site).inc(len(response.content))
        self.bytes["uploaded"] += sent
        self.bytes["sample_request"] += sent
        self.bytes["downloaded"] += len(response.content)
        self.bytes["handoff"] += len(response.content)
        spec = {"x_tc": TensorSpec((k, *fed.image_shape))}
        if self.plan().carries_state:
            spec["x0_prev"] = spec["x_tc"]
        tensors, meta = decode_tensors(response.content, max_bytes=128 * 2**20, expect=spec)
        state = None
        if "x0_prev" in tensors:
            state = SolverState(tensors["x0_prev"], int(meta["t_prev"]))
        return tensors["x_tc"], state, int(meta.get("version", -1))

    def _sample_labels(self, k: int) -> Tensor | None:
        """Labels to condition the site model on, drawn from the site's own label mix."""
        if not self.fed.site_labels or self.labels is None:
            return None
        idx = torch.randint(0, len(self.labels), (k,), generator=self.generator)
        return self.labels[idx]


class _Stopped(Exception):
    pass
