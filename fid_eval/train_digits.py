"""Train the `digits` extractor's classifier on the embedded digits train split (CPU, well under a minute).

    python -m fid_eval.train_digits                        # writes fid_eval/weights/digits_cnn.pt
    python -m fid_eval.train_digits --epochs 1 --out /tmp/digits_cnn.pt

Deterministic: one seed drives the initialisation, the batch order, the augmentation and dropout. The
held-out val split is never trained on; its accuracy is printed at the end.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fid_eval.digits import DEFAULT_WEIGHTS, DigitsCNN, preprocess
from fid_eval.digits_data import load_digits_split
from fid_eval.fileio import atomic_write


def _digits_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float (N, 1, 16, 16) in [-1, 1], labels (N,)) of a digits split."""
    images, labels = load_digits_split(split, 16)
    return preprocess(torch.from_numpy(images)[:, None]), torch.from_numpy(labels)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (+-10 deg), scale (0.9-1.1) and shift (+-1.5 px) of x (N, 1, 16, 16)."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1.5 / 8)  # normalised coords: 8 px per unit
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, 16, 16, 2)
    # padding "border" would smear strokes; pad with the background value -1 instead
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


@torch.no_grad()
def accuracy(net: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
    """(overall accuracy, per-class accuracy (10,)) of net on float inputs x with labels y."""
    pred = net.eval()(x)[1].argmax(dim=1)
    per_class = np.array([(pred[y == c] == c).float().mean().item() for c in range(net.head.out_features)])
    return (pred == y).float().mean().item(), per_class


def train(epochs: int = 30, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> DigitsCNN:
    """A DigitsCNN trained on the train split with AdamW and a cosine learning rate."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = _digits_tensors("train")
    net = DigitsCNN()
    steps = epochs * math.ceil(len(y) / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for idx in order.split(batch_size):
            loss = F.cross_entropy(net(_augment(x[idx], gen))[1], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {total / len(y):.4f}")
    net.eval()
    with torch.no_grad():
        hidden = net.body(x)  # (N, 64)
        net.feature_scale.fill_(hidden.pow(2).mean().rsqrt().item())  # E|f|^2 / D = 1 on train
    return net


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fid_eval.train_digits", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS, help="state_dict file to write")
    args = parser.parse_args(argv)

    start = time.time()
    net = train(args.epochs, seed=args.seed)
    train_acc, _ = accuracy(net, *_digits_tensors("train"))
    val_acc, per_class = accuracy(net, *_digits_tensors("val"))
    with atomic_write(args.out) as f:  # a file object: the archive's inner name does not depend on the path
        torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, f)
    print(f"train accuracy {train_acc:.4f}  val accuracy {val_acc:.4f}  "
          f"(per class: {' '.join(f'{a:.2f}' for a in per_class)})")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
