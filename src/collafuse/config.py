"""The federation config: defined once, validated once, shared by every component.

:class:`FederationConfig` is what the coordinator serves and every service checks against
(its :meth:`~FederationConfig.fingerprint`). :class:`RunConfig` adds what one local run
(``collafuse simulate`` or the local stack) needs: data, training budgets, evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collafuse.diffusion import Prediction, UploadMode
from collafuse.presets import preset_for
from collafuse.schedule import ScheduleKind, check_t_cut, cut_step
from collafuse.solvers import SAMPLERS, Handoff, Sampler, Spacing
from collafuse.unet import UNetSpec

SamplerName = Literal["ddpm"] | Sampler
"""How a run samples: ancestral DDPM (:mod:`collafuse.diffusion`) or a few-step solver
(:mod:`collafuse.solvers`, docs/samplers.md)."""
SAMPLER_NAMES: tuple[str, ...] = ("ddpm", *SAMPLERS)

DEFAULT_CLIENT_FRACTION = 0.9  # privacy worth the name starts here (docs/method.md §5)


class ModelConfig(BaseModel):
    """A U-Net's size (see :class:`collafuse.unet.UNetSpec`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_channels: int = Field(32, ge=4)
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = Field(1, ge=1)
    attention: bool = False
    attention_levels: tuple[int, ...] = ()

    def spec(self) -> UNetSpec:
        return UNetSpec(
            self.base_channels,
            self.channel_mults,
            self.num_res_blocks,
            self.attention,
            self.attention_levels,
        )

    @classmethod
    def of(cls, spec: UNetSpec) -> ModelConfig:
        return cls.model_validate(spec.to_dict())


SITE_MODEL = ModelConfig.of(preset_for((1, 28, 28)).site)
SERVER_MODEL = ModelConfig.of(preset_for((1, 28, 28)).server)


class FederationConfig(BaseModel):
    """What every component of one federation must agree on.

    Give ``client_fraction`` (the share ``c`` of steps run at the site) or ``t_cut`` (the
    canonical cut step); the other is derived, and both must agree if both are given.
    ``t_cut = 0`` (the server sees raw images) needs ``centralized=True``. Models left out
    are the preset of ``image_shape`` (:mod:`collafuse.presets`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    T: int = Field(100, ge=2, le=10000)
    schedule: ScheduleKind = "cosine"
    client_fraction: float = DEFAULT_CLIENT_FRACTION
    t_cut: int = -1  # filled in from client_fraction
    centralized: bool = False
    upload_mode: UploadMode = "exact"
    image_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = Field(10, ge=1)
    sites: tuple[str, ...] = ("site-0", "site-1", "site-2")
    server_conditioning: Literal["site", "none"] = "site"
    prediction: Prediction = "v"  # what every network outputs (collafuse.diffusion.Prediction)
    site_labels: bool = False
    share_labels: bool = False
    releases: int = Field(1, ge=1)
    site_model: ModelConfig = SITE_MODEL
    server_model: ModelConfig = SERVER_MODEL
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _resolve_cut(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        shape = data.get("image_shape", (1, 28, 28))
        if isinstance(shape, (list, tuple)) and len(shape) == 3:
            preset = preset_for(tuple(int(v) for v in shape))
            data.setdefault("site_model", ModelConfig.of(preset.site))
            data.setdefault("server_model", ModelConfig.of(preset.server))
        T = int(data.get("T", 100))
        centralized = bool(data.get("centralized", False))
        c, t_cut = data.get("client_fraction"), data.get("t_cut", -1)
        if t_cut is None:
            t_cut = -1
        if c is None and t_cut == -1:
            c = DEFAULT_CLIENT_FRACTION
        if c is not None:
            derived = cut_step(float(c), T, allow_centralized=centralized)
            if t_cut not in (-1, derived):
                raise ValueError(
                    f"client_fraction={c} gives t_cut={derived} at T={T}, but t_cut={t_cut} "
                    "was given; pass one of them"
                )
            data["client_fraction"], data["t_cut"] = float(c), derived
        else:
            check_t_cut(t_cut, T, allow_centralized=centralized)
            data["client_fraction"], data["t_cut"] = t_cut / T, t_cut
        return data

    @field_validator("sites")
    @classmethod
    def _check_sites(cls, sites: tuple[str, ...]) -> tuple[str, ...]:
        if not sites:
            raise ValueError("a federation needs at least one site")
        if len(set(sites)) != len(sites):
            raise ValueError(f"site ids must be unique, got {list(sites)}")
        for s in sites:
            if not s or len(s) > 63 or not all(ch.isalnum() or ch == "-" for ch in s):
                raise ValueError(f"site id {s!r} must be 1-63 letters, digits or '-'")
        return sites

    @field_validator("image_shape")
    @classmethod
    def _check_shape(cls, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = shape
        if c not in (1, 3) or h < 4 or w < 4:
            raise ValueError(f"image_shape must be [1 or 3, H >= 4, W >= 4], got {list(shape)}")
        return shape

    @model_validator(mode="after")
    def _check_combination(self) -> FederationConfig:
        if self.site_labels and self.num_classes < 2:
            raise ValueError("site_labels needs num_classes >= 2")
        _, h, w = self.image_shape
        for role, model in (("site_model", self.site_model), ("server_model", self.server_model)):
            k = model.spec().downsampling
            if h % k or w % k:
                raise ValueError(
                    f"{role} halves the resolution {len(model.channel_mults) - 1} times, so the "
                    f"image sides must be divisible by {k}; {h}x{w} is not (choose another "
                    "image size or fewer channel_mults)"
                )
        return self

    @property
    def n_sites(self) -> int:
        return len(self.sites)

    @property
    def site_steps(self) -> int:
        """Denoising steps run at the site (``t_c``)."""
        return self.t_cut

    @property
    def server_steps(self) -> int:
        """Denoising steps run at the server (``T - t_c``)."""
        return self.T - self.t_cut

    @property
    def server_num_classes(self) -> int:
        """Size of the server's condition embedding (site ids), 0 when unconditional."""
        return self.n_sites if self.server_conditioning == "site" else 0

    @property
    def site_num_classes(self) -> int:
        return self.num_classes if self.site_labels else 0

    @property
    def pixels(self) -> int:
        return math.prod(self.image_shape)

    def site_index(self, site: str) -> int:
        """The server's condition id of ``site``; ``KeyError`` names an unknown site."""
        try:
            return self.sites.index(site)
        except ValueError:
            raise KeyError(f"unknown site {site!r}; known: {', '.join(self.sites)}") from None

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: components refuse to work with a different one."""
        blob = json.dumps(self.to_json_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


class RunConfig(BaseModel):
    """One local run: the federation plus data, budgets and evaluation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation: FederationConfig = FederationConfig()
    data: str | None = None  # None: Fashion-MNIST from Debian's package or COLLAFUSE_DATA
    # bring the data to this square size / channel count (None: as the data are); the
    # federation's image_shape follows (README, "Your own data")
    image_size: int | None = Field(None, ge=4, le=1024)
    channels: Literal[1, 3] | None = None
    # Inception FID/KID in the report: None = when the domain classifier does not fit the data
    inception: bool | None = None
    partition: Literal["iid", "label-skew", "dirichlet"] = "label-skew"
    classes_per_site: int = Field(3, ge=1)
    dirichlet_alpha: float = Field(0.5, gt=0)
    images_per_site: int | None = Field(2000, ge=10)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)
    site_train_steps: int = Field(600, ge=0)
    server_train_steps: int = Field(600, ge=0)
    time_budget_s: float | None = Field(None, gt=0)  # per model, instead of / as well as steps
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    samples_per_site: int = Field(200, ge=1)
    sample_batch_size: int = Field(200, ge=1)
    server_sample_steps: int | None = Field(None, ge=1)  # None = every step
    site_sample_steps: int | None = Field(None, ge=1)
    sampler: SamplerName = "ddpm"
    spacing: Spacing = "uniform"  # of each side's few steps (docs/samplers.md)
    sampler_eta: float = Field(0.0, ge=0, le=1)  # ddim only: 0 deterministic, 1 DDPM-like
    # multistep solvers at the cut: restart at first order (robust with two different networks)
    # or continue the server's history ("handoff": exact, unstable below ~10 site steps)
    handoff: Handoff = "restart"
    clip_x0: bool = True
    reid_pool: int = Field(1000, ge=2)
    attack_steps: int = Field(400, ge=0)
    torch_threads: int = Field(2, ge=1)
    checkpoint_every: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _check_shape(self) -> RunConfig:
        c, h, w = self.federation.image_shape
        if self.image_size is not None and (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"image_size {self.image_size} disagrees with federation.image_shape "
                f"{[c, h, w]}; give one of them"
            )
        if self.channels is not None and c != self.channels:
            raise ValueError(
                f"channels {self.channels} disagrees with federation.image_shape {[c, h, w]}; "
                "give one of them"
            )
        return self

    @model_validator(mode="after")
    def _check_sampling(self) -> RunConfig:
        fed = self.federation
        if self.sampler != "ddpm" and fed.upload_mode != "exact":
            raise ValueError(
                f"sampler {self.sampler!r} needs upload_mode 'exact' (the ablations sample with "
                f"ddpm), got {fed.upload_mode!r}"
            )
        if self.sampler_eta and self.sampler != "ddim":
            raise ValueError(f"sampler_eta is for ddim only, not {self.sampler!r}")
        if self.sampler == "ddpm" and self.spacing != "uniform":
            raise ValueError("ddpm respaces uniformly; spacing 'logsnr' is for the solvers")
        return self

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
