#!/usr/bin/env python3
"""PyTorch eager on a CUDA GPU, on the steps `sequel bench --device cuda` times (scripts/gpu-check.sh).

    python3 scripts/torch_gpu_reference.py [--device cuda:0] [--steps 300] [--json FILE]

A step: zero_grad, forward, mean cross-entropy, backward, SGD step (lr 0.01, no momentum), f32,
cycling 8 batches generated on the GPU beforehand (x ~ U[0,1), labels uniform over 10 classes),
followed by reading the loss (one host sync per step, as sequel's step does). Backbones as
sequel-core/src/model/: MLP 784-100-100-10 (ReLU), and ResNet-18 with base width 20 (reduced) or
64 on 3x32x32 inputs: 3x3 stem without max-pool, BatchNorm, four stages of two basic blocks,
global average pooling, linear head. Prints steps/s per configuration (median of 3 repeats).
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = self.b2(self.c2(h))
        return F.relu(h + (x if self.short is None else self.short(x)))


class ResNet18(nn.Module):
    def __init__(self, nf, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, nf, 3, 1, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())
        layers, cin = [], nf
        for i, w in enumerate([nf, 2 * nf, 4 * nf, 8 * nf]):
            for j in range(2):
                layers.append(Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        h = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def steps_per_s(model, shape, batch, steps, device):
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [(torch.rand((batch,) + shape, device=device), torch.randint(0, 10, (batch,), device=device))
            for _ in range(8)]

    def run(n):
        for i in range(n):
            x, y = data[i % 8]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            loss.item()

    run(30)
    rates = []
    for _ in range(3):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        run(steps)
        torch.cuda.synchronize(device)
        rates.append(steps / (time.perf_counter() - t))
    return statistics.median(rates)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    configs = {
        "mlp100 b10": (mlp, (1, 28, 28), 10),
        "mlp100 b128": (mlp, (1, 28, 28), 128),
        "resnet18r b32": (lambda: ResNet18(20), (3, 32, 32), 32),
        "resnet18 b32": (lambda: ResNet18(64), (3, 32, 32), 32),
    }
    result = {}
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(a.device)}")
    for name, (make, shape, batch) in configs.items():
        result[name] = round(steps_per_s(make(), shape, batch, a.steps, a.device), 1)
        print(f"{name:>14} {result[name]:>10.1f} steps/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
