"""The two roles of an in-process federation: a site and the shared server.

Each role keeps its own state and talks to the other only through the messages of
:mod:`collafuse.federation.messages`, as the services do over HTTP.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from collafuse.config import FederationConfig, RunConfig
from collafuse.data import Dataset
from collafuse.federation.messages import Disclosure, HandOff, SampleRequest
from collafuse.privacy.guard import check_upload
from collafuse.schedule import Schedule
from collafuse.solvers import SolverState
from collafuse.training import (
    SamplingPlan,
    Trainer,
    atomic_write,
    build_server_model,
    build_site_model,
    checkpoint_meta,
    make_disclosure,
    model_to_bytes,
    server_half,
    server_training_set,
    site_finish,
    train_server,
    train_site,
)
from collafuse.wire import TensorSpec, decode_tensors, max_payload_bytes


def secret_generator() -> torch.Generator:
    """A generator seeded from the OS's entropy: a site's secret noise source."""
    return torch.Generator().manual_seed(secrets.randbits(63))


@dataclass
class Site:
    """One site: private data, private low-noise model, one disclosure, local finishing."""

    site_id: str
    fed: FederationConfig
    run: RunConfig
    schedule: Schedule
    train_data: Dataset
    heldout: Dataset
    state_dir: Path
    trainer: Trainer = field(init=False)
    compute_seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "sample": 0.0})
    nfe: int = 0

    def __post_init__(self) -> None:
        torch.manual_seed(self.fed.seed + 1000 + self.fed.site_index(self.site_id))
        self.trainer = Trainer(build_site_model(self.fed), self.run.lr, self.run.ema_decay)

    @property
    def disclosure_path(self) -> Path:
        return self.state_dir / "disclosure.safetensors"

    def train(self, generator: torch.Generator, progress: bool = False) -> list[float]:
        losses = train_site(
            self.trainer,
            self.fed,
            self.schedule,
            self.train_data.images,
            self.train_data.labels,
            self.run.site_train_steps,
            self.run.batch_size,
            generator,
            time_budget_s=self.run.time_budget_s,
            progress=progress,
        )
        self.compute_seconds["train"] = self.trainer.compute_seconds
        self.save_checkpoint()
        return losses

    def disclosure(self) -> Disclosure:
        """The one-time upload. Made once with site-secret noise and stored atomically before
        it is sent; every later call (a retry, a restart) re-sends the same bytes."""
        if self.disclosure_path.exists():
            return Disclosure(self.site_id, self.disclosure_path.read_bytes())
        tensors = make_disclosure(
            self.fed, self.schedule, self.train_data.images, secret_generator()
        )
        if self.fed.share_labels:
            tensors["y"] = self.train_data.labels  # the services' tensor name
        message = Disclosure.build(self.site_id, tensors, self.fed.fingerprint())
        atomic_write(self.disclosure_path, message.payload)
        return message

    def request(self, n: int) -> SampleRequest:
        return SampleRequest(self.site_id, n)

    def finish(
        self,
        handoff: HandOff,
        generator: torch.Generator,
        plan: SamplingPlan,
        n_site_steps: int,
    ) -> Tensor:
        """Run the site's steps from the hand-offs to images; they stay at the site."""
        start = time.perf_counter()
        x_tc = handoff.x_tc()
        out = site_finish(
            self.trainer.ema,
            self.fed,
            self.schedule,
            x_tc,
            generator,
            clip_x0=self.run.clip_x0,
            plan=plan,
            state=handoff.state(),
        )
        self.compute_seconds["sample"] += time.perf_counter() - start
        self.nfe += n_site_steps * len(x_tc)
        return out

    def save_checkpoint(self) -> None:
        meta = checkpoint_meta(
            self.fed, "site", self.trainer.step, self.site_id, self.fed.site_model
        )
        atomic_write(self.state_dir / "model.safetensors", model_to_bytes(self.trainer.ema, meta))


@dataclass
class Server:
    """The shared server: validated ingest, training on the pooled disclosures, hand-offs."""

    fed: FederationConfig
    run: RunConfig
    schedule: Schedule
    state_dir: Path
    trainer: Trainer = field(init=False)
    received: dict[str, Disclosure] = field(default_factory=dict)  # content hash -> message
    disclosed_images: dict[str, int] = field(default_factory=dict)  # the ledger: site -> images
    compute_seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "sample": 0.0})
    nfe: int = 0

    def __post_init__(self) -> None:
        torch.manual_seed(self.fed.seed + 2000)
        self.trainer = Trainer(build_server_model(self.fed), self.run.lr, self.run.ema_decay)

    def ingest(self, message: Disclosure, n_images: int) -> bool:
        """Validate and keep a disclosure of the ``n_images`` the site declared, through the
        coordinator's raw-data guard; returns False for a replay of the same bytes."""
        self.fed.site_index(message.site)  # unknown site -> KeyError
        if message.key in self.received:
            return False
        spec = TensorSpec((n_images, *self.fed.image_shape))
        expect = {"x_tc": spec} if self.fed.upload_mode != "noise-revealed" else None
        if expect is not None and self.fed.share_labels:
            expect["y"] = TensorSpec((n_images,), ("int64",))
        limit = max_payload_bytes(n_images, self.fed.image_shape, bytes_per_value=12)
        tensors, _ = decode_tensors(message.payload, max_bytes=limit, expect=expect)
        if self.fed.t_cut > 0 and self.fed.upload_mode != "noise-revealed":
            check_upload(tensors["x_tc"], self.schedule.abar(self.fed.t_cut), what=message.site)
        self.received[message.key] = message
        self.disclosed_images[message.site] = n_images
        return True

    def training_set(self) -> tuple[Tensor, Tensor]:
        """The pooled disclosed images ``[N, C, H, W]`` and the site id of each ``[N]``."""
        images, ids = [], []
        for message in self.received.values():
            x = server_training_set(self.fed, self.schedule, message.tensors())
            images.append(x.to(torch.float32))
            ids.append(torch.full((len(x),), self.fed.site_index(message.site), dtype=torch.long))
        return torch.cat(images), torch.cat(ids)

    def train(self, generator: torch.Generator, progress: bool = False) -> list[float]:
        x, ids = self.training_set()
        losses = train_server(
            self.trainer,
            self.fed,
            self.schedule,
            x,
            ids,
            self.run.server_train_steps,
            self.run.batch_size,
            generator,
            time_budget_s=self.run.time_budget_s,
            progress=progress,
        )
        self.compute_seconds["train"] = self.trainer.compute_seconds
        meta = checkpoint_meta(self.fed, "server", self.trainer.step, None, self.fed.server_model)
        atomic_write(self.state_dir / "model.safetensors", model_to_bytes(self.trainer.ema, meta))
        return losses

    def serve(
        self,
        requests: list[SampleRequest],
        generator: torch.Generator,
        plan: SamplingPlan,
        n_server_steps: int,
    ) -> list[HandOff]:
        """Answer several sites' requests in shared forward passes."""
        start = time.perf_counter()
        ids = torch.cat(
            [torch.full((r.n,), self.fed.site_index(r.site), dtype=torch.long) for r in requests]
        )
        x_tc, state = server_half(self.trainer.ema, self.fed, self.schedule, ids, generator, plan)
        self.compute_seconds["sample"] += time.perf_counter() - start
        self.nfe += n_server_steps * len(ids)
        out, i = [], 0
        for r in requests:
            part = None if state is None else SolverState(state.x0_hat[i : i + r.n], state.t)
            out.append(HandOff.build(r.site, x_tc[i : i + r.n], state=part))
            i += r.n
        return out
