"""Train the Fashion-MNIST classifier whose features define the project's "domain" FID/KID.

Deterministic on the CPU: fixed seed, fixed thread count, ``torch.use_deterministic_algorithms``,
a seeded generator for the shuffles. Trains on the Fashion-MNIST train split, evaluates on the
test split, and writes the weights (safetensors, with the architecture in its metadata) and a
JSON training record into the package assets:

    .venv/bin/python scripts/train_classifier.py                 # defaults below
    .venv/bin/python scripts/train_classifier.py --epochs 5 --seed 0 --out-dir src/collafuse/assets
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from collafuse.data import Dataset, load_fashion_mnist
from collafuse.eval.classifier import ASSET_INFO, ASSET_WEIGHTS, FashionClassifier

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "collafuse" / "assets"
MIN_ACCURACY = 0.88


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="idx folder (default: Debian's)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode)."""
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size]  # [B, 1, 28, 28]
        correct += int((model(x).argmax(1) == data.labels[start : start + batch_size]).sum())
    return correct / len(data)


def random_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    """Flip each image ``[B, C, H, W]`` left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def train_epoch(
    model: nn.Module,
    data: Dataset,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    gen: torch.Generator,
) -> float:
    """One pass over ``data`` in a seeded random order; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(data), generator=gen)
    total, batches = 0.0, 0
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        x = random_flip(data.images[idx], gen)  # [B, 1, 28, 28]
        loss = nn.functional.cross_entropy(model(x), data.labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total, batches = total + loss.item(), batches + 1
    return total / batches


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, write the assets; exit status 1 if accuracy is below the bar."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    # NaN-filling of fresh memory (part of deterministic mode) costs ~30% here;
    # results do not depend on it
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(args.seed)

    train, test = load_fashion_mnist(args.data, "train"), load_fashion_mnist(args.data, "test")
    model = FashionClassifier()
    steps = args.epochs * -(-len(train) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        loss = train_epoch(model, train, opt, sched, args.batch_size, gen)
        acc = accuracy(model, test)
        print(
            f"epoch {epoch}: loss {loss:.4f} test acc {acc:.4f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    seconds = time.perf_counter() - start
    acc = accuracy(model, test)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / ASSET_WEIGHTS
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, weights, metadata={"config": json.dumps(model.config)})
    weights.chmod(0o644)  # safetensors writes 0600; the non-root service user must read it
    info = {
        "test_accuracy": acc,
        "train_split": "fashion-mnist train (60000)",
        "test_split": "fashion-mnist test (10000)",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "threads": args.threads,
        "train_seconds": round(seconds, 1),
        "config": model.config,
        "n_params": sum(p.numel() for p in model.parameters()),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "command": shlex.join(["python", "scripts/train_classifier.py", *sys.argv[1:]]),
        "torch_version": torch.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (args.out_dir / ASSET_INFO).write_text(json.dumps(info, indent=2) + "\n")
    print(f"test accuracy {acc:.4f} in {seconds:.0f} s; wrote {weights} and {ASSET_INFO}")
    if acc < MIN_ACCURACY:
        print(f"accuracy {acc:.4f} is below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
