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


# The original's validate.py flags that cannot apply here: accepted at their default, refused with the
# reason otherwise. dest -> (default, reason).
REFUSED = {
    "pretrained": (False, "no weights are downloaded: pass a file with --checkpoint"),
    "class_map": ("", "labels come from the checkpoint's class_names, else from the sorted class folders"),
    "tf_preprocessing": (False, "TensorFlow preprocessing needs TensorFlow and was a timm 0.4 option"),
    "legacy_jit": (False, "the legacy JIT fuser only existed in PyTorch 1.5-1.6"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", metavar="DIR", help="dataset root (holding --split) or the split folder itself")
    parser.add_argument("--dataset", "-d", default="", help="only ImageFolder datasets: '' or 'folder'")
    parser.add_argument("--split", default="val", help="'validation' falls back to 'val', as in timm 0.4")
    parser.add_argument("--model", "-m", default="elsa_swin_tiny")
    parser.add_argument("--checkpoint", default="", help="weights to evaluate (ours or the original's)")
    parser.add_argument("--pretrained", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    parser.add_argument("--num-classes", type=int, default=None, help="default: from the checkpoint's classifier")
    parser.add_argument("--class-map", default="", help=argparse.SUPPRESS)
    parser.add_argument("--gp", default=None, help="global pool: ELSA-Swin pools by average ('avg') only")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"))
    parser.add_argument("--crop-pct", type=float, default=None)
    parser.add_argument("--interpolation", default="")
    parser.add_argument("--mean", type=float, nargs=3, default=None)
    parser.add_argument("--std", type=float, nargs=3, default=None)
    parser.add_argument("-b", "--batch-size", type=int, default=256)
    parser.add_argument("-j", "--workers", type=int, default=4)
    parser.add_argument("--num-gpu", type=int, default=1, help="1: one process evaluates on one device")
    parser.add_argument(
        "--no-test-pool",
        action="store_true",
        help="accepted for the original's commands: ELSA-Swin has no test-time pooling to disable",
    )
    parser.add_argument(
        "--no-prefetcher", action="store_true", help="normalise in the loader workers instead of on the device"
    )
    parser.add_argument("--pin-mem", action="store_true")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (torch.amp)")
    parser.add_argument("--apex-amp", action="store_true", help="alias of --amp (NVIDIA apex is not used)")
    parser.add_argument("--native-amp", action="store_true", help="alias of --amp")
    parser.add_argument("--amp-dtype", default=None, choices=["float16", "bfloat16"])
    parser.add_argument("--tf-preprocessing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--torchscript", action="store_true", help="evaluate the TorchScript-compiled model")
    parser.add_argument("--legacy-jit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-interval", "--log-freq", type=int, default=10)
    parser.add_argument("--results-file", default="", help="write the metrics to this .json or .csv file")
    parser.add_argument("--real-labels", default="", help="ImageNet ReaL labels JSON: report ReaL top-1/top-5")
    parser.add_argument("--valid-labels", default="", help="text file of class indices to score among")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for dest, (default, reason) in REFUSED.items():
        if getattr(args, dest) != default:
            raise SystemExit(f"error: --{dest.replace('_', '-')} is not supported: {reason}")
    if args.dataset.lower() not in ("", "folder", "imagefolder"):
        raise SystemExit(f"error: --dataset {args.dataset} is not supported: only ImageFolder folders are read")
    if args.gp not in (None, "avg"):
        raise SystemExit(f"error: --gp {args.gp} is not supported: ELSA-Swin pools by average ('avg') only")
    if args.num_gpu != 1:
        raise SystemExit(f"error: --num-gpu {args.num_gpu} is not supported: one process evaluates on one device")
    if args.batch_size < 1:
        raise SystemExit(f"error: -b/--batch-size must be at least 1, got {args.batch_size}")
    return args


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
    args = parse_args(argv)
    root = Path(args.data_dir)
    if args.split == "validation" and not (root / args.split).is_dir() and (root / "val").is_dir():
        args.split = "val"
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
        img_size = args.img_size or (args.input_size[-1] if args.input_size else None)
        model = create_from_checkpoint(
            args.model, checkpoint, args.checkpoint, args.num_classes, img_size, use_ema=args.use_ema
        )
    except ValueError as e:  # an unknown model, or a checkpoint that does not fit it (CheckpointError)
        raise SystemExit(f"error: {e}") from None
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(vars(args), model=model, verbose=True)
    valid = None
    if args.valid_labels:  # a dataset of some of the model's classes (ImageNet-A/-R), in index order
        if checkpoint is not None and checkpoint.get("class_names") is not None:
            raise SystemExit("error: --valid-labels is for checkpoints without class names; this one names its classes")
        try:
            indices = {int(line) for line in Path(args.valid_labels).read_text().split()}
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --valid-labels {args.valid_labels}: {e}") from None
        valid = torch.tensor([i in indices for i in range(model.num_classes)], device=device)
    classes = int(valid.sum()) if valid is not None else model.num_classes
    dataset = build_dataset(folder, checkpoint, classes, args.checkpoint)
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
        pin_memory=args.pin_mem,
        device=device,
        use_prefetcher=not args.no_prefetcher,
    )
    amp_ctx, _ = resolve_amp(args, device)
    if args.torchscript:
        model = torch.jit.script(model)
    real_labels = None
    if args.real_labels:
        from timm.data import RealLabelsImagenet

        names = [dataset.filename(i, basename=True) for i in range(len(dataset))]
        try:
            real_labels = RealLabelsImagenet(names, real_json=args.real_labels)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"error: --real-labels {args.real_labels}: {e}") from None

    loss_fn = nn.CrossEntropyLoss()
    losses, top1, top5 = utils.AverageMeter(), utils.AverageMeter(), utils.AverageMeter()
    start = time.time()
    for idx, (logits, target) in enumerate(predict(model, loader, device, amp_ctx, args.channels_last)):
        if valid is not None:
            logits = logits[:, valid]
        if real_labels is not None:
            real_labels.add_result(logits)
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
    top1_avg, top5_avg = top1.avg, top5.avg
    if real_labels is not None:
        top1_avg, top5_avg = real_labels.get_accuracy(k=1), real_labels.get_accuracy(k=5)
    results = dict(
        model=args.model,
        checkpoint=args.checkpoint,
        top1=round(top1_avg, 4),
        top5=round(top5_avg, 4),
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
