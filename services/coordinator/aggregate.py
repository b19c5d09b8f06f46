"""Averaging the server trainers' replicas into one published checkpoint version.

Round ``v`` starts when checkpoint ``v`` of role ``server`` is current. Each trainer replica
loads ``v``, trains, and pushes its weights tagged with ``base_version = v``. The push is
persisted (``aggregation/<v>/<replica>.safetensors``) before it is acknowledged. The round
closes when ``replicas`` distinct replicas have pushed, or ``window_s`` seconds after its first
push (the schedule: a slow or dead replica never blocks the federation); the coordinator then
publishes version ``v + 1``: the element-wise **mean, weighted equally**, of the pushed model
weights and of their EMA weights. (Replicas train the same number of steps per round, so
equal weights are the FedAvg weights; optimizer moments stay with each replica.)

Push payload: safetensors with ``model.<name>`` and ``ema.<name>`` for every entry of the
server model's ``state_dict``, and metadata ``replica``, ``base_version``, ``step`` (the
replica's total optimizer steps, >= 0), ``T``, ``t_cut``.

A push is refused (422 ``diverged-weights``) before it can reach a published version when a
float tensor's RMS exceeds ``MAX_GROWTH`` times the base version's plus ``GROWTH_FLOOR``, or
when one forward pass of either weight set on fixed noise at ``t = T`` and ``t = t_cut + 1``
gives a non-finite value or one beyond ``MAX_OUTPUT``: a replica whose training blew up must
never hand the sites garbage. A push replayed after its round closed is a duplicate (200).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load, save
from torch import Tensor

from collafuse.config import FederationConfig
from collafuse.services.coordinator.ingest import ascii_int, check_declared_cut
from collafuse.store import Store, current_checkpoint, publish_checkpoint, read_manifest
from collafuse.training import build_server_model, checkpoint_meta, model_to_bytes
from collafuse.wire import (
    TensorSpec,
    canonical,
    content_hash,
    decode_tensors,
    max_payload_bytes,
)

__all__ = ["ROLE", "AggregationRejected", "Aggregator", "encode_push", "split_push"]

log = logging.getLogger(__name__)

ROLE = "server"
MAX_GROWTH = 100.0
"""A pushed tensor's RMS may be at most this many times the base version's (plus the floor)."""
GROWTH_FLOOR = 1.0
MAX_OUTPUT = 1e3
"""Largest |output| of the network on fixed noise (its targets, eps or v, are O(1))."""
_REPLICA = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class AggregationRejected(ValueError):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason = status, reason


def encode_push(model: dict[str, Tensor], ema: dict[str, Tensor], meta: dict[str, str]) -> bytes:
    """A trainer's push payload (see the module docstring)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous().clone() for k, v in ema.items()})
    return canonical(bytes(save(tensors, metadata=meta)))  # equal pushes, equal bytes


def split_push(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return model, ema


@dataclass
class _Round:
    base: int
    pushes: dict[str, tuple[str, int]] = field(default_factory=dict)  # replica -> (digest, step)
    first_at: float | None = None


class Aggregator:
    """Collects pushes for the current round and publishes their mean."""

    def __init__(
        self, store: Store, fed: FederationConfig, *, replicas: int = 1, window_s: float = 60.0
    ) -> None:
        if replicas < 1 or window_s <= 0:
            raise ValueError(f"replicas ({replicas}) must be >= 1 and window_s ({window_s}) > 0")
        self.store, self.fed = store, fed
        self.replicas, self.window_s = replicas, window_s
        template = build_server_model(fed).state_dict()
        self.specs = {}
        for name, value in template.items():
            dtypes = (
                ("float32", "float16")
                if value.is_floating_point()
                else (str(value.dtype).removeprefix("torch."),)
            )
            for prefix in ("model.", "ema."):
                self.specs[prefix + name] = TensorSpec(tuple(value.shape), dtypes)
        n_values = sum(v.numel() for v in template.values())
        self.max_bytes = max_payload_bytes(
            2 * n_values, (1,), extra_per_item=0, header_bytes=64 * 1024 + 200 * len(template)
        )
        self._lock = threading.Lock()
        self._round: _Round | None = None

    # -- version 0 and the current round ---------------------------------------------------

    def ensure_initial(self) -> int:
        """Publish version 0 (a fresh model seeded from the config) if nothing is published;
        returns the current version. Idempotent."""
        with self._lock:
            manifest = read_manifest(self.store, ROLE)
            if manifest is not None:
                return int(manifest["current"])
            with torch.random.fork_rng():
                torch.manual_seed(self.fed.seed)
                model = build_server_model(self.fed)
            meta = {
                **checkpoint_meta(self.fed, ROLE, 0, model=self.fed.server_model),
                "version": 0,
                "replicas": [],
                "aggregation": "initial",
            }
            blob = model_to_bytes(model, meta)
            publish_checkpoint(
                self.store, ROLE, 0, {"model.safetensors": blob, "ema.safetensors": blob}, meta
            )
            log.info("published the initial server checkpoint v0")
            return 0

    def current_version(self) -> int:
        manifest = read_manifest(self.store, ROLE)
        return -1 if manifest is None else int(manifest["current"])

    def _load_round(self, base: int) -> _Round:
        """The open round for ``base``, reloading persisted pushes after a restart."""
        if self._round is not None and self._round.base == base:
            return self._round
        rnd = _Round(base)
        for key in self.store.list(f"aggregation/{base:08d}/"):
            name = key.rsplit("/", 1)[-1]
            if not name.endswith(".safetensors"):
                continue
            meta_key = key.removesuffix(".safetensors") + ".json"
            info = self.store.get_json(meta_key) if self.store.exists(meta_key) else None
            if info is None:
                continue  # a push whose acknowledgement was never written
            rnd.pushes[name.removesuffix(".safetensors")] = (info["sha256"], int(info["step"]))
        if rnd.pushes:
            rnd.first_at = time.monotonic()
        self._round = rnd
        return rnd

    # -- pushes ------------------------------------------------------------------------------

    def push(self, body: bytes) -> dict[str, object]:
        """Validate and persist one replica's weights; publish if the round is complete."""
        tensors, meta = decode_tensors(body, max_bytes=self.max_bytes, expect=self.specs)
        check_declared_cut(self.fed, meta, "the pushed weights")
        replica = meta.get("replica", "")
        if not _REPLICA.fullmatch(replica):
            raise AggregationRejected(
                422, "bad-metadata", f"metadata replica={replica!r}: want 1-63 of [A-Za-z0-9._-]"
            )
        base = ascii_int(meta.get("base_version", ""))
        step = ascii_int(meta.get("step", ""))
        if base is None or step is None:
            raise AggregationRejected(
                422,
                "bad-metadata",
                "metadata needs base_version and step as non-negative integers, got "
                f"base_version={meta.get('base_version')!r}, step={meta.get('step')!r}",
            )
        digest = content_hash(body)
        with self._lock:
            current = self.current_version()
            replayed = self._replayed(base, replica, digest, current)
            if replayed is not None:
                return replayed
            if base != current:
                raise AggregationRejected(
                    409,
                    "stale-base",
                    f"push from {replica!r} is based on version {base}, but the current version "
                    f"is {current}: load version {current} and train again",
                )
            rnd = self._load_round(base)
            if replica in rnd.pushes:
                raise AggregationRejected(
                    409,
                    "already-pushed",
                    f"replica {replica!r} already pushed different weights for round {base}",
                )
            self._check_weights(tensors, base)
            prefix = f"aggregation/{base:08d}/{replica}"
            self.store.put(f"{prefix}.safetensors", body)
            record = {
                "sha256": digest,
                "step": step,
                "images": meta.get("images"),
                "disclosures": meta.get("disclosures"),
            }
            self.store.put_json(f"{prefix}.json", record)
            rnd.pushes[replica] = (digest, step)
            if rnd.first_at is None:
                rnd.first_at = time.monotonic()
            published = None
            if len(rnd.pushes) >= self.replicas:
                published = self._publish(rnd)
        return {
            "status": "accepted",
            "duplicate": False,
            "round": base,
            "published": published,
            "pending": sorted(rnd.pushes) if published is None else [],
        }

    def _replayed(
        self, base: int, replica: str, digest: str, current: int
    ) -> dict[str, object] | None:
        """The answer to a push already accepted for round ``base`` (None if it is new)."""
        if base > current:
            return None
        meta_key = f"aggregation/{base:08d}/{replica}.json"
        if not self.store.exists(meta_key):
            return None
        if self.store.get_json(meta_key).get("sha256") != digest:
            return None  # different weights: refused below (stale base or already pushed)
        published: int | None = base + 1 if base < current else None
        if base == current:
            rnd = self._load_round(base)
            published = self._publish(rnd) if len(rnd.pushes) >= self.replicas else None
        return {"status": "duplicate", "duplicate": True, "round": base, "published": published}

    def _check_weights(self, tensors: dict[str, Tensor], base: int) -> None:
        """Refuse pushed weights that blew up (module docstring); caller holds the lock."""
        found = current_checkpoint(self.store, ROLE)
        reference = load(found[1]["model.safetensors"]) if found and found[0] == base else {}
        model, ema = split_push(tensors)
        for kind, state in (("model", model), ("ema", ema)):
            for name, value in state.items():
                ref = reference.get(name)
                if not value.is_floating_point() or ref is None:
                    continue
                limit = MAX_GROWTH * _rms(ref) + GROWTH_FLOOR
                if _rms(value) > limit:
                    raise AggregationRejected(
                        422,
                        "diverged-weights",
                        f"pushed {kind} weights {name!r} have RMS {_rms(value):.3g}, over "
                        f"{limit:.3g} ({MAX_GROWTH:g}x version {base}'s + {GROWTH_FLOOR:g}): "
                        "the replica's training diverged",
                    )
            self._check_outputs(kind, state)

    def _check_outputs(self, kind: str, state: dict[str, Tensor]) -> None:
        """One forward pass on fixed noise must be finite and O(1)."""
        net = build_server_model(self.fed)
        net.load_state_dict(state)
        net.eval()
        n = len(self.fed.sites)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((n, *self.fed.image_shape), generator=gen)
        y = torch.arange(n) if self.fed.server_conditioning == "site" else None
        with torch.no_grad():
            for t in {self.fed.T, min(self.fed.t_cut + 1, self.fed.T)}:
                out = net(x, torch.full((n,), t, dtype=torch.long), y)
                peak = float(out.abs().max())
                if not math.isfinite(peak) or peak > MAX_OUTPUT:
                    raise AggregationRejected(
                        422,
                        "diverged-weights",
                        f"pushed {kind} weights give output |{peak:.3g}| at t={t} on unit "
                        f"noise (limit {MAX_OUTPUT:g}): the replica's training diverged",
                    )

    def tick(self) -> int | None:
        """Close the round if it is complete or its window has passed (on a schedule)."""
        with self._lock:
            current = self.current_version()
            if current < 0:
                return None
            rnd = self._load_round(current)  # after a restart: the persisted pushes
            if not rnd.pushes or rnd.first_at is None:
                return None
            complete = len(rnd.pushes) >= self.replicas  # e.g. a publish that failed before
            if not complete and time.monotonic() - rnd.first_at < self.window_s:
                return None
            if not complete:
                log.info(
                    "aggregation window passed with %d of %d replicas",
                    len(rnd.pushes),
                    self.replicas,
                )
            return self._publish(rnd)

    def _publish(self, rnd: _Round) -> int:
        """Average the round's pushes and publish ``base + 1`` (caller holds the lock)."""
        models, emas, steps, trained_on = [], [], [], {}
        for replica, (digest, step) in sorted(rnd.pushes.items()):
            body = self.store.get(f"aggregation/{rnd.base:08d}/{replica}.safetensors")
            record = self.store.get_json(f"aggregation/{rnd.base:08d}/{replica}.json")
            trained_on[replica] = {
                "images": record.get("images"),
                "disclosures": record.get("disclosures"),
            }
            if content_hash(body) != digest:
                raise ValueError(f"stored push of {replica!r} for round {rnd.base} is corrupt")
            tensors, _ = decode_tensors(body, max_bytes=self.max_bytes, expect=self.specs)
            model, ema = split_push(tensors)
            models.append(model)
            emas.append(ema)
            steps.append(step)
        mean_model, mean_ema = average(models), average(emas)
        version = rnd.base + 1
        step = round(sum(steps) / len(steps))
        meta = {
            **checkpoint_meta(self.fed, ROLE, step, model=self.fed.server_model),
            "version": version,
            "replicas": sorted(rnd.pushes),
            "replica_steps": steps,
            "trained_on": trained_on,
            "aggregation": "mean",
        }
        publish_checkpoint(
            self.store,
            ROLE,
            version,
            {
                "model.safetensors": _state_bytes(mean_model, meta),
                "ema.safetensors": _state_bytes(mean_ema, meta),
            },
            meta,
        )
        self._round = None
        log.info(
            "published server checkpoint v%d (mean of %s, step %d)",
            version,
            sorted(rnd.pushes),
            step,
        )
        return version

    def status(self) -> dict[str, object]:
        with self._lock:
            rnd = self._round
            return {
                "replicas": self.replicas,
                "window_s": self.window_s,
                "round": None if rnd is None else rnd.base,
                "pending": [] if rnd is None else sorted(rnd.pushes),
            }

    def current(self) -> tuple[int, dict[str, bytes], dict[str, object]] | None:
        return current_checkpoint(self.store, ROLE)


def average(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Element-wise mean of float tensors (float64 accumulation); other tensors from the first."""
    out: dict[str, Tensor] = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros(first.shape, dtype=torch.float64)
            for state in states:
                acc += state[name].to(torch.float64)
            out[name] = (acc / len(states)).to(first.dtype)
        else:
            out[name] = first.clone()
    return out


def _rms(x: Tensor) -> float:
    return float(x.to(torch.float64).pow(2).mean().sqrt()) if x.numel() else 0.0


def _state_bytes(state: dict[str, Tensor], meta: dict[str, object]) -> bytes:
    return bytes(
        save(
            {k: v.contiguous() for k, v in state.items()},
            metadata={"collafuse": json.dumps(meta, sort_keys=True)},
        )
    )
