"""The training loader of cls/train.py on its two paths, in one run: timm's prefetcher (the default: uint8
batches mixed in the collate, normalised and randomly erased on the device) and --no-prefetcher (float32
batches normalised and erased in the workers, mixed in the training loop).

Both are built by train.py's own ``build_loaders`` with the README's augmentation (RandAugment, mixup 0.8 /
cutmix 1.0, random erasing 0.25) and timed in turns, so that a machine whose speed drifts slows both alike.
Prints a markdown table: images/s (median of the rounds, mixup included) and the bytes of one batch as it
leaves the workers.

    python benchmarks/bench_cls_loader.py                        # synthetic 256 x 256 JPEGs, 224 crops
    python benchmarks/bench_cls_loader.py --data /data/imagenet -b 128 -j 8 --batches 50
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import resolve_data_config

from elsa_cls import train

README_AUG = [
    "--aa",
    "rand-m9-mstd0.5-inc1",
    "--mixup",
    "0.8",
    "--cutmix",
    "1.",
    "--remode",
    "pixel",
    "--reprob",
    "0.25",
]


def synthetic_folder(root: Path, classes: int, per_class: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class if split == "train" else 1):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def time_path(args, datasets, config, device, batches: int) -> tuple[float, int]:
    """(images/s over ``batches`` batches after one warm-up batch, bytes of one batch out of the workers)."""
    collate, mixup_fn = train.build_mixup(args, len(datasets[0].class_names), prefetcher=not args.no_prefetcher)
    loader, _ = train.build_loaders(args, *datasets, config, device, collate)
    inner = loader if args.no_prefetcher else loader.loader
    x, _ = next(iter(inner))
    nbytes = x.element_size() * x.numel()
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        x, target = next(it)
        if args.no_prefetcher:
            x, target = mixup_fn(x.to(device), target.to(device))
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start), nbytes


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="an ImageFolder root (default: synthetic JPEGs)")
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = opts.data or str(synthetic_folder(Path(tmp), 4, opts.batch_size * (opts.batches + 2) // 4 + 1, 256))
        common = [data, "--img-size", str(opts.img_size), "-b", str(opts.batch_size), "-j", str(opts.workers)]
        paths = {"prefetcher": [], "--no-prefetcher": ["--no-prefetcher"]}
        parsed = {}
        for name, extra in paths.items():
            args = train.parse_args([*common, *README_AUG, "--device", opts.device, *extra])
            args.distributed, args.rank, args.world_size = False, 0, 1
            parsed[name] = args
        device = torch.device(opts.device)
        datasets = train.build_datasets(parsed["prefetcher"])
        with torch.device("meta"):
            model = train.build_model(parsed["prefetcher"], len(datasets[0].class_names))
        config = resolve_data_config(vars(parsed["prefetcher"]), model=model)
        rates: dict[str, list[float]] = {name: [] for name in paths}
        sizes: dict[str, int] = {}
        for _ in range(opts.rounds):
            for name, args in parsed.items():
                rate, sizes[name] = time_path(args, datasets, config, device, opts.batches)
                rates[name].append(rate)
    rows = [dict(path=name, img_per_s=statistics.median(r), batch_bytes=sizes[name]) for name, r in rates.items()]
    print(
        f"device {opts.device}, batch {opts.batch_size}, {opts.workers} workers, {opts.img_size} px, README augmentation"
    )
    print("| loader path | images/s | bytes per batch out of the workers |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['path']} | {row['img_per_s']:.1f} | {row['batch_bytes']:,} |")
    return rows


if __name__ == "__main__":
    main()
