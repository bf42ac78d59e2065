"""Small ImageFolder datasets and runs of the cls/ tools for the classification tests: `run` in a separate
process, as a user runs them, `tool_error` in this one for the errors a tool stops with."""

import csv
import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLS = Path(__file__).resolve().parents[1] / "cls"
DATA = Path(__file__).resolve().parent / "data"  # the reference tensors of the original code
# README: the classifier reproduces the original's logits within this.
LOGITS_ATOL = 5e-7


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


def tool_error(tool: str, args: list[str]) -> str:
    """The error with which cls/<tool>.py stops for `args`, from its main(args) in this process.

    The tools turn every bad input into SystemExit("error: ..."), which Python prints as the last line of
    stderr with no traceback; any other exception fails the test. The message must be one line."""
    main = importlib.import_module(f"elsa_cls.{tool}").main
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as stop:
            main(args)
    finally:  # the tools add their console handler to the root logger: leave it as it was
        root.handlers[:] = handlers
        root.setLevel(level)
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


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
    "--cooldown-epochs",
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
