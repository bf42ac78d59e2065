"""Write scikit-learn's digits (1,797 real 8x8 handwritten digits, shipped inside the package) as an
ImageFolder: <out>/train/<digit>/*.png and <out>/val/<digit>/*.png, upscaled to --size pixels.

    python cls/make_digits.py data/digits
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 1:
        raise SystemExit(f"error: --size must be at least 1, got {args.size}")
    if not 0 <= args.val_fraction < 1:
        raise SystemExit(f"error: --val-fraction must be in [0, 1), got {args.val_fraction}")
    if (args.out / "val").is_dir() and any((args.out / "val").rglob("*.png")):
        print(f"{args.out} already holds the digits")
        return
    digits = load_digits()
    order = np.random.default_rng(args.seed).permutation(len(digits.images))
    n_val = int(len(order) * args.val_fraction)
    for rank, idx in enumerate(order):
        split = "val" if rank < n_val else "train"
        folder = args.out / split / str(digits.target[idx])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").resize((args.size, args.size), Image.BICUBIC).save(
            folder / f"{idx:04d}.png"
        )
    print(f"wrote {len(order) - n_val} train and {n_val} val images to {args.out}")


if __name__ == "__main__":
    main()
