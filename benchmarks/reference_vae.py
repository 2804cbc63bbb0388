"""The standard reference recipe for the MNIST VAE, as the PyTorch examples repository trains it.

A torchvision MNIST dataset with the ToTensor transform behind a shuffling DataLoader, the
784-400-20-400-784 MLP (fc1, fc21/fc22, fc3, fc4) with ReLU, binary cross-entropy summed over pixels
plus the closed-form KL, Adam at lr 1e-3, batch 128, 10 epochs on all 60,000 training images, and the
test loss averaged per image over the 10,000 test images. It is the yardstick for the MLP reference
cell of the default study (`linear-z20-b1-s0`):

    python benchmarks/reference_vae.py --epochs 10

torchvision's MNIST reads uncompressed IDX files, so the .gz files are extracted into
.vaebench/torchvision (the data root stays read-only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets, transforms

from pipeline.bench.throughput import torchvision_root
from pipeline.config import load_study
from pipeline.data import verify_checksums


class ReferenceVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def forward(self, x):
        h = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--train-images",
        type=int,
        default=60_000,
        help="train on the first N training images (vaebench bench: as many as the study's cell)",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the study file naming the data root")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = load_study(args.params)
    verify_checksums(config.data.root)
    root = torchvision_root(config.data.root)
    train = datasets.MNIST(root, train=True, transform=transforms.ToTensor())
    if args.train_images < len(train):
        train = torch.utils.data.Subset(train, range(args.train_images))
    test = datasets.MNIST(root, train=False, transform=transforms.ToTensor())
    train_loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test, batch_size=128, shuffle=False)
    model = ReferenceVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        model.train()
        train_loss = 0.0
        for data, _ in train_loader:
            optimizer.zero_grad()
            recon, mu, logvar = model(data)
            loss = loss_function(recon, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        seconds = time.perf_counter() - started
        model.eval()
        test_loss = 0.0
        with torch.no_grad():
            for data, _ in test_loader:
                recon, mu, logvar = model(data)
                test_loss += loss_function(recon, data, mu, logvar).item()
        print(
            f"epoch {epoch}: train loss {train_loss / len(train):.4f}  test loss {test_loss / len(test):.4f} "
            f"nats/image  ({seconds:.1f} s training)",
            flush=True,
        )


if __name__ == "__main__":
    main()
