"""FLOP counts of one training step and one denoising step, for compute-matched baselines.

Counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the real network (matrix
multiplies and convolutions; normalisations and activations are not counted, which is the usual
convention). Deterministic, unlike compute-seconds on a shared machine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from collafuse.config import ModelConfig
from collafuse.unet import UNet


def _model(model: ModelConfig, channels: int, num_classes: int) -> UNet:
    return UNet(model.spec(), channels, num_classes)


def forward_flops(
    model: ModelConfig, image_shape: tuple[int, int, int], num_classes: int = 0
) -> int:
    """FLOPs of one forward pass on one image ``[1, C, H, W]`` (one NFE)."""
    net = _model(model, image_shape[0], num_classes).eval()
    x = torch.zeros(1, *image_shape)
    t = torch.ones(1, dtype=torch.long)
    y = torch.zeros(1, dtype=torch.long) if num_classes else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, t, y)
    return int(counter.get_total_flops())


def train_step_flops(
    model: ModelConfig, image_shape: tuple[int, int, int], batch_size: int, num_classes: int = 0
) -> int:
    """FLOPs of one optimizer step (forward + backward) on a batch of ``batch_size`` images."""
    net = _model(model, image_shape[0], num_classes).train()
    x = torch.zeros(batch_size, *image_shape)
    t = torch.ones(batch_size, dtype=torch.long)
    y = torch.zeros(batch_size, dtype=torch.long) if num_classes else None
    with FlopCounterMode(display=False) as counter:
        net(x, t, y).square().mean().backward()
    return int(counter.get_total_flops())


def collafuse_flops(report: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of a finished CollaFuse run, from its own config and step counts.

    Training: optimizer steps actually taken (``report["training"]``) x FLOPs per step.
    Sampling: NFE per image x forward FLOPs, per generated image and in total.
    """
    from collafuse.config import RunConfig

    run = RunConfig.model_validate(report["config"]["run"])
    fed = run.federation
    shape = fed.image_shape
    site_step = train_step_flops(fed.site_model, shape, run.batch_size, fed.site_num_classes)
    server_step = train_step_flops(fed.server_model, shape, run.batch_size, fed.server_num_classes)
    site_fwd = forward_flops(fed.site_model, shape, fed.site_num_classes)
    server_fwd = forward_flops(fed.server_model, shape, fed.server_num_classes)
    site_steps = sum(int(v) for v in report["training"]["site_steps"].values())
    server_steps = int(report["training"]["server_steps"])
    cost = report["cost"]
    n_samples = sum(int(s["quality"]["n_fake"]) for s in report["sites"])
    site_img = site_fwd * int(cost["site_nfe_per_sample"])
    server_img = server_fwd * int(cost["server_nfe_per_sample"])
    return {
        "counter": "torch.utils.flop_counter (matmul/conv FLOPs)",
        "site_train_step": site_step,
        "server_train_step": server_step,
        "site_train_total": site_step * site_steps,
        "server_train_total": server_step * server_steps,
        "site_sample_per_image": site_img,
        "server_sample_per_image": server_img,
        "site_sample_total": site_img * n_samples,
        "server_sample_total": server_img * n_samples,
    }
