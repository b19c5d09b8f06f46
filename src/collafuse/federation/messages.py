"""Typed messages between sites and the server, encoded as they travel, with byte accounting.

The in-process simulator passes these through the same wire codec the services use, so the
bytes it counts are the bytes a deployment would send.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from collafuse.solvers import SolverState
from collafuse.wire import MAX_BODY_BYTES, content_hash, decode_tensors, encode_tensors


@dataclass(frozen=True)
class Disclosure:
    """A site's one-time upload: its noised images (and labels only if shared)."""

    site: str
    payload: bytes  # safetensors: "x_tc" [N, C, H, W] (or the ablation's tensors)

    @property
    def key(self) -> str:
        """Idempotency key: the content hash of the exact bytes."""
        return content_hash(self.payload)

    @staticmethod
    def build(site: str, tensors: dict[str, Tensor], fingerprint: str) -> Disclosure:
        return Disclosure(site, encode_tensors(tensors, {"site": site, "config": fingerprint}))

    def tensors(self, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Tensor]:
        return decode_tensors(self.payload, max_bytes=max_bytes)[0]


@dataclass(frozen=True)
class SampleRequest:
    """A site asks the server for ``n`` hand-offs conditioned on its own id."""

    site: str
    n: int

    def encoded_size(self) -> int:
        return len(f'{{"site": "{self.site}", "n": {self.n}}}'.encode())


@dataclass(frozen=True)
class HandOff:
    """The server's answer: ``x_tc`` for each requested sample (a noisy image) and, for a
    multistep solver that continues across the cut, its last data prediction ``x0_prev`` made
    at step ``t_prev`` (server to site only: no privacy cost; docs/samplers.md)."""

    site: str
    payload: bytes

    @staticmethod
    def build(
        site: str, x_tc: Tensor, fp16: bool = False, state: SolverState | None = None
    ) -> HandOff:
        tensors = {"x_tc": x_tc.contiguous()}
        meta = {"site": site}
        if state is not None:
            tensors["x0_prev"] = state.x0_hat.contiguous()
            meta["t_prev"] = str(state.t)
        return HandOff(site, encode_tensors(tensors, meta, fp16))

    def x_tc(self, max_bytes: int = MAX_BODY_BYTES) -> Tensor:
        return decode_tensors(self.payload, max_bytes=max_bytes)[0]["x_tc"].to(torch.float32)

    def state(self, max_bytes: int = MAX_BODY_BYTES) -> SolverState | None:
        """The server's multistep state, if the hand-off carries one."""
        tensors, meta = decode_tensors(self.payload, max_bytes=max_bytes)
        if "x0_prev" not in tensors:
            return None
        return SolverState(tensors["x0_prev"].to(torch.float32), int(meta["t_prev"]))


@dataclass
class ByteLedger:
    """Bytes sent per site and direction, per message kind."""

    uploaded: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    downloaded: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def up(self, site: str, kind: str, n_bytes: int) -> None:
        self.uploaded[site] += n_bytes
        self.by_kind[kind] += n_bytes

    def down(self, site: str, kind: str, n_bytes: int) -> None:
        self.downloaded[site] += n_bytes
        self.by_kind[kind] += n_bytes

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {
            "uploaded_by_site": dict(self.uploaded),
            "downloaded_by_site": dict(self.downloaded),
            "by_kind": dict(self.by_kind),
        }
