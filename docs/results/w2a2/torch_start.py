"""The start model's recipe written again in PyTorch, to find what moves its accuracy.

lbq's full-precision start (`reproduce --methods=fp --epochs=3`): CIFAR ResNet-20, plain ReLU,
option-A shortcuts (subsample, zero-pad the new channels), BatchNorm momentum 0.1 and eps 1e-5;
3 epochs of SGD with Nesterov momentum 0.9, weight decay 1e-4 on every parameter, batch 128
(the last partial batch dropped), learning rate 0.1 on a per-step cosine; training images
zero-padded by 4, randomly cropped to 32 and flipped; normalised by CIFAR-10's mean and std.
Top-1 on the full 10,000-image test split.

``--init`` picks the initialisation, the one part of the recipe that PyTorch's defaults and
lbq's choices differ in:

- ``lbq``: lbq's (`lbq.quant.layers.conv_kernel_init`, He normal over fan-out as torchvision's
  ResNets; the classifier as Flax's ``nn.Dense``: LeCun truncated normal, zero bias);
- ``torch``: PyTorch's defaults (``kaiming_uniform_(a=sqrt(5))`` for conv and linear weights,
  uniform linear bias), as a plain PyTorch script gets them.

Run it from this folder with torch and pillow installed (one thread when anything else runs):

    OMP_NUM_THREADS=1 python torch_start.py --data=/work/data --init=torch --seed=0 --out=OUT

It prints one line per epoch and writes ``OUT/result.json`` (top-1, the recipe, the seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

MEAN = (125.307, 122.950, 113.865)  # lbq.data.config's CIFAR-10 mean and std (0..255)
STD = (62.993, 62.089, 66.705)


def load_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All JPEGs of ``root/split/<class>/*.jpg`` as uint8 [N, 32, 32, 3] and int64 labels,
    cached beside the images' parent as ``.npz`` (decoding 60,000 files takes a minute)."""
    cache = os.path.join(root, f"{split}_uint8.npz")
    if os.path.exists(cache):
        with np.load(cache) as saved:
            return saved["images"], saved["labels"]
    classes = sorted(os.listdir(os.path.join(root, split)))
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, split, name)
        for file in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, file)) as img:
                images.append(np.asarray(img.convert("RGB")))
            labels.append(label)
    images, labels = np.stack(images), np.asarray(labels, np.int64)
    np.savez(cache, images=images, labels=labels)
    return images, labels


class Block(nn.Module):
    def __init__(self, in_features: int, features: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, features, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(features)
        self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(features)
        self.stride, self.extra = stride, features - in_features

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.extra:  # option A: the new channels are zeros, half before and half after
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(y + shortcut)


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, features = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for index in range(3):
                blocks.append(Block(features, width, stride if index == 0 else 1))
                features = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.classifier(x.mean(dim=(2, 3)))


def use_lbq_init(model: nn.Module) -> None:
    """lbq's initialisation: convs He normal over fan-out; the classifier LeCun normal
    truncated at 2 standard deviations (Flax's lecun_normal), zero bias."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            # Flax's truncated normal keeps the variance 1/fan_in after truncation.
            std = math.sqrt(1.0 / module.in_features) / 0.87962566103423978
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(module.bias)


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad by 4, random 32x32 crop, random horizontal flip: uint8 [B, 32, 32, 3]."""
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = rng.integers(0, 9, size=(len(images), 2))
    flips = rng.random(len(images)) < 0.5
    out = np.empty_like(images)
    for i, ((dy, dx), flip) in enumerate(zip(offsets, flips, strict=True)):
        crop = padded[i, dy : dy + 32, dx : dx + 32]
        out[i] = crop[:, ::-1] if flip else crop
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = (images.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def top1(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 500):
            logits = model(to_tensor(images[start : start + 500]))
            correct += int((logits.argmax(1).numpy() == labels[start : start + 500]).sum())
    model.train()
    return correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder with train/ and test/ JPEGs")
    parser.add_argument("--init", choices=("lbq", "torch"), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_x, train_y = load_split(args.data, "train")
    test_x, test_y = load_split(args.data, "test")
    model = ResNet20()
    if args.init == "lbq":
        use_lbq_init(model)
    batch, lr = 128, 0.1
    steps_per_epoch = len(train_x) // batch
    total = steps_per_epoch * args.epochs
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    began, step = time.time(), 0
    for epoch in range(args.epochs):
        order = rng.permutation(len(train_x))
        for index in range(steps_per_epoch):
            rows = order[index * batch : (index + 1) * batch]
            for group in optimizer.param_groups:  # per-step cosine from lr to 0
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            logits = model(to_tensor(augment(train_x[rows], rng)))
            loss = F.cross_entropy(logits, torch.from_numpy(train_y[rows]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        accuracy = top1(model, test_x, test_y)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test top-1 {accuracy:.4f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    record = {
        "top1": accuracy,
        "init": args.init,
        "seed": args.seed,
        "epochs": args.epochs,
        "steps": total,
        "seconds": round(time.time() - began, 1),
        "torch": torch.__version__,
    }
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
