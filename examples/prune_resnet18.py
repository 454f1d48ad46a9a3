"""Prune a torchvision ResNet-18 with this project as a library, from your own training loop.

    pip install -e .            # once, in the project folder
    python examples/prune_resnet18.py [--method hydra|obs] [--k 0.5] [--steps 100] [--out r18_slim.pt2]

Data: scikit-learn's bundled 8x8 digits (no download), upsampled to 32x32 and repeated to 3 channels. The model is a
plain ``torchvision.models.resnet18``: nothing here is specific to this project's architectures.
The core is the ten lines between the two ``---`` comments: convert to masked layers, build the
mask set (k, granularity, scope), learn the mask (HYDRA scores with an ordinary loop, or one OBS
step), export a slimmed program that runs with PyTorch alone.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits

from deploy import export_model
from layers import MaskSet, init_scores, to_masked
from pruning.methods import PRUNE_METHODS
from pruning.solver import FisherSettings, OBSSolver


def digits(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)  # CIFAR-sized, 3-channel inputs
    y = torch.tensor(data.target)
    return list(zip(x.split(batch), y.split(batch)))


def train_dense(model: torch.nn.Module, batches: list, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def accuracy(model: torch.nn.Module, batches: list) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    model.train()
    return 100.0 * hits / sum(len(y) for _, y in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("hydra", "obs"), default="hydra")
    parser.add_argument("--k", type=float, default=0.5, help="density: fraction of filters kept")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="r18_slim.pt2")
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = digits(64)
    model = torchvision.models.resnet18(num_classes=10)
    train_dense(model, batches, args.steps)  # stands in for your pretrained model
    print(f"dense: {accuracy(model, batches):.1f}% train top-1")

    # --- prune any nn.Module ---
    to_masked(model, granularity="filter", exclude=["conv1"])   # the stem stays dense
    maskset = MaskSet(model, k=args.k, granularity="filter", scope="layer")
    if args.method == "hydra":                      # learn scores with frozen weights (HYDRA)
        init_scores(maskset.layers, kind="scaled")
        scores = [layer.popup_scores for layer in maskset.layers.values()]
        for p in model.parameters():
            p.requires_grad_(any(p is s for s in scores))
        train_dense(model, batches, args.steps)     # your loop: the optimizer sees only the scores
        maskset.freeze()
    else:                                           # one second-order OBS step (WoodFisher's)
        maskset.freeze()
        solver = OBSSolver(maskset.layers, granularity="filter", method=PRUNE_METHODS["woodfisher"],
                           fisher=FisherSettings(m=32, samples_per_grad=4, damp=1e-5, block_size=512))
        solver.collect(model.eval(), batches)
        solver.prune_to(args.k, scope="layer")
    result = export_model(model.eval(), example=batches[0][0][:1], format="slim", path=args.out)
    # --- done: args.out runs with torch.export.load(path).module() ---

    print(f"pruned ({args.method}, filter k={args.k}): {accuracy(model, batches):.1f}% train top-1")
    for line in result.lines():
        print(line)


if __name__ == "__main__":
    main()
