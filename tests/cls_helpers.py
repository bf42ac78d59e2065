"""Small ImageFolder datasets and runs of the cls/ scripts for the classification tests."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLS = Path(__file__).resolve().parents[1] / "cls"


def write_digits(root: Path, per_class: int = 30, val_per_class: int = 10) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {}
    for img, label in zip(digits.images, digits.target, strict=True):
        if label >= 4:  # four classes keep the run short
            continue
        n = counts.get(label, 0)
        if n >= per_class + val_per_class:
            continue
        counts[label] = n + 1
        split = "val" if n < val_per_class else "train"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 15.9).astype(np.uint8)).convert("RGB").resize((32, 32)).save(folder / f"{n}.png")
    return root


def run(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, *args], cwd=CLS, env=env, capture_output=True, text=True, timeout=900, **kwargs
    )
    return result


TRAIN_ARGS = [
    "--model",
    "elsa_swin_nano",
    "--img-size",
    "32",
    "-b",
    "16",
    "-j",
    "0",
    "--lr",
    "2e-3",
    "--warmup-epochs",
    "0",
    "--scale",
    "0.8",
    "1",
    "--hflip",
    "0",
    "--log-interval",
    "5",
    "--seed",
    "0",
]


def read_summary(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))
