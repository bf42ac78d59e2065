"""Evaluate a checkpoint on an ImageFolder split: top-1, top-5, loss and images/s.

Loads checkpoints written by train.py and the published ones of the original code (``state_dict``,
``state_dict_ema``, ``model`` and ``module.`` prefixes are all understood).

    python cls/validate.py <DATA> --model elsa_swin_tiny --checkpoint <FILE> --no-test-pool --apex-amp --img-size 224 -b 128
"""

import argparse
import csv
import io
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
from timm import utils
from timm.data import create_loader, resolve_data_config

import elsa_swin  # noqa: F401  (registers the ELSA-Swin models with timm)
from elsa_swin import CheckpointError, create_from_checkpoint, load_checkpoint_file
from elsa_swin.files import atomic_write_text

from .data import DatasetError, ImageFolderDataset, check_image_folder
from .inference import predict, resolve_amp

_logger = logging.getLogger("validate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", metavar="DIR", help="dataset root (holding --split) or the split folder itself")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", default="elsa_swin_tiny")
    parser.add_argument("--checkpoint", default="", help="weights to evaluate (ours or the original's)")
    parser.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    parser.add_argument("--num-classes", type=int, default=None, help="default: from the checkpoint's classifier")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--crop-pct", type=float, default=None)
    parser.add_argument("--interpolation", default="")
    parser.add_argument("--mean", type=float, nargs=3, default=None)
    parser.add_argument("--std", type=float, nargs=3, default=None)
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("-j", "--workers", type=int, default=4)
    parser.add_argument(
        "--no-test-pool",
        action="store_true",
        help="accepted for the original's commands: ELSA-Swin has no test-time pooling to disable",
    )
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (torch.amp)")
    parser.add_argument("--apex-amp", action="store_true", help="alias of --amp (NVIDIA apex is not used)")
    parser.add_argument("--native-amp", action="store_true", help="alias of --amp")
    parser.add_argument("--amp-dtype", default=None, choices=["float16", "bfloat16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--results-file", default="", help="write the metrics to this .json or .csv file")
    return parser


def build_dataset(folder: Path, checkpoint: dict | None, num_classes: int, source: str) -> ImageFolderDataset:
    """The split labelled through the class names train.py stored in the checkpoint; without them (the
    original's ImageNet checkpoints), through the sorted class folders, which must then be as many as
    the model's classes, so that no label can shift."""
    names = checkpoint.get("class_names") if checkpoint is not None else None
    try:
        if names is not None:
            return ImageFolderDataset(folder, class_names=names)
        dataset = ImageFolderDataset(folder)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    if len(dataset.class_names) != num_classes:
        raise SystemExit(
            f"error: {folder} has {len(dataset.class_names)} class folders but the model has {num_classes} "
            f"classes{f' and {source} names none' if source else ''}: the labels would not line up"
        )
    return dataset


def main(argv=None) -> dict:
    utils.setup_default_logging()
    args = build_parser().parse_args(argv)
    root = Path(args.data_dir)
    split = args.split if (root / args.split).is_dir() else ""
    try:
        folder = check_image_folder(args.data_dir, split)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    device = torch.device(args.device)

    try:
        checkpoint = load_checkpoint_file(args.checkpoint) if args.checkpoint else None
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        model = create_from_checkpoint(
            args.model, checkpoint, args.checkpoint, args.num_classes, args.img_size, use_ema=args.use_ema
        )
    except ValueError as e:  # an unknown model, or a checkpoint that does not fit it (CheckpointError)
        raise SystemExit(f"error: {e}") from None
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(vars(args), model=model, verbose=True)
    dataset = build_dataset(folder, checkpoint, model.num_classes, args.checkpoint)
    loader = create_loader(
        dataset,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config["crop_pct"],
        num_workers=args.workers,
        device=device,
        use_prefetcher=False,
    )
    amp_ctx, _ = resolve_amp(args, device)

    loss_fn = nn.CrossEntropyLoss()
    losses, top1, top5 = utils.AverageMeter(), utils.AverageMeter(), utils.AverageMeter()
    start = time.time()
    for idx, (logits, target) in enumerate(predict(model, loader, device, amp_ctx, args.channels_last)):
        keep = target >= 0  # unreadable images (named in the log) are left out
        logits, target = logits[keep], target[keep]
        if not len(target):
            continue
        acc1, acc5 = utils.accuracy(logits, target, topk=(1, min(5, logits.shape[1])))
        n = target.size(0)
        losses.update(loss_fn(logits, target).item(), n)
        top1.update(acc1.item(), n)
        top5.update(acc5.item(), n)
        if idx % args.log_interval == 0:
            rate = losses.count / (time.time() - start)
            _logger.info(
                f"Test: [{idx + 1:>4d}/{len(loader)}] loss {losses.avg:.4f} top-1 {top1.avg:.3f} "
                f"top-5 {top5.avg:.3f} {rate:.1f} img/s"
            )
    elapsed = time.time() - start
    if losses.count == 0:
        raise SystemExit(f"error: no image of {folder} could be read")
    results = dict(
        model=args.model,
        checkpoint=args.checkpoint,
        top1=round(top1.avg, 4),
        top5=round(top5.avg, 4),
        loss=round(losses.avg, 4),
        img_per_sec=round(losses.count / elapsed, 2),
        images=losses.count,
        img_size=data_config["input_size"][-1],
    )
    _logger.info(
        f" * Acc@1 {results['top1']:.3f} Acc@5 {results['top5']:.3f} loss {results['loss']:.4f} "
        f"({results['img_per_sec']:.1f} img/s)"
    )
    if args.results_file:
        path = Path(args.results_file)
        if path.suffix == ".csv":
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=list(results))
            writer.writeheader()
            writer.writerow(results)
            atomic_write_text(path, text.getvalue())
        else:
            atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
