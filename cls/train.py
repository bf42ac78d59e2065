#!/usr/bin/env python3
"""Train an ELSA-Swin (or any timm model) on an ImageFolder dataset.

Built on timm's data, augmentation, mixup, optimizer, scheduler, EMA and checkpoint factories. Run on one
process, or on several with torchrun (see distributed_train.sh): NCCL on GPUs, gloo on CPU.

    python train.py <DATA> --model elsa_swin_tiny --epochs 300 -b 128 --opt adamw --lr 1e-3 ...
"""
import argparse
import csv
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from timm import utils
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, load_checkpoint, resume_checkpoint, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

import models  # noqa: F401  (registers the ELSA-Swin models)
from data_checks import DatasetError, check_image_folder
from models import checkpoint_filter_fn
from inference import predict, resolve_amp

_logger = logging.getLogger("train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="", metavar="FILE", help="YAML file whose keys set argument defaults")
    group = parser.add_argument_group("Dataset parameters")
    group.add_argument("data_dir", metavar="DIR", help="dataset root holding train/ and val/ class folders")
    group.add_argument("--train-split", default="train")
    group.add_argument("--val-split", default="val")
    group = parser.add_argument_group("Model parameters")
    group.add_argument("--model", default="elsa_swin_tiny")
    group.add_argument("--initial-checkpoint", default="", help="weights to start from (ours or the original's)")
    group.add_argument("--resume", default="", help="checkpoint to resume model, optimizer, scaler, EMA and epoch from")
    group.add_argument("--no-resume-opt", action="store_true", help="with --resume, restore the model only")
    group.add_argument("--num-classes", type=int, default=None, help="default: the number of class folders")
    group.add_argument("--img-size", type=int, default=None)
    group.add_argument("--interpolation", default="")
    group.add_argument("--crop-pct", type=float, default=None)
    group.add_argument("--mean", type=float, nargs=3, default=None)
    group.add_argument("--std", type=float, nargs=3, default=None)
    group.add_argument("-b", "--batch-size", type=int, default=128, help="per process")
    group.add_argument("--grad-checkpointing", action="store_true")
    group.add_argument("--channels-last", action="store_true")
    group.add_argument("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile backend")
    group = parser.add_argument_group("Optimizer parameters")
    group.add_argument("--opt", default="adamw")
    group.add_argument("--opt-eps", type=float, default=None)
    group.add_argument("--opt-betas", type=float, nargs="+", default=None)
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--clip-grad", type=float, default=None)
    group.add_argument("--clip-mode", default="norm")
    group.add_argument("--layer-decay", type=float, default=None)
    group = parser.add_argument_group("Learning rate schedule parameters")
    group.add_argument("--sched", default="cosine")
    group.add_argument("--sched-on-updates", action="store_true")
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--warmup-lr", type=float, default=1e-6)
    group.add_argument("--min-lr", type=float, default=1e-5)
    group.add_argument("--epochs", type=int, default=300)
    group.add_argument("--start-epoch", type=int, default=None)
    group.add_argument("--warmup-epochs", type=int, default=5)
    group.add_argument("--cooldown-epochs", type=int, default=0)
    group.add_argument("--decay-epochs", type=float, default=90)
    group.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270])
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1)
    group.add_argument("--patience-epochs", type=int, default=10)
    group.add_argument("--lr-cycle-mul", type=float, default=1.0)
    group.add_argument("--lr-cycle-decay", type=float, default=0.5)
    group.add_argument("--lr-cycle-limit", type=int, default=1)
    group.add_argument("--lr-k-decay", type=float, default=1.0)
    group.add_argument("--lr-noise", type=float, nargs="+", default=None)
    group.add_argument("--warmup-prefix", action="store_true")
    group = parser.add_argument_group("Augmentation and regularization parameters")
    group.add_argument("--no-aug", action="store_true")
    group.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0])
    group.add_argument("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0])
    group.add_argument("--hflip", type=float, default=0.5)
    group.add_argument("--vflip", type=float, default=0.0)
    group.add_argument("--color-jitter", type=float, default=0.4)
    group.add_argument("--aa", default=None, help='AutoAugment policy, e.g. "rand-m9-mstd0.5-inc1"')
    group.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    group.add_argument("--remode", default="pixel", help="random erasing mode")
    group.add_argument("--recount", type=int, default=1)
    group.add_argument("--mixup", type=float, default=0.0)
    group.add_argument("--cutmix", type=float, default=0.0)
    group.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    group.add_argument("--mixup-prob", type=float, default=1.0)
    group.add_argument("--mixup-switch-prob", type=float, default=0.5)
    group.add_argument("--mixup-mode", default="batch")
    group.add_argument("--mixup-off-epoch", type=int, default=0)
    group.add_argument("--smoothing", type=float, default=0.1)
    group.add_argument("--drop", type=float, default=0.0)
    group.add_argument("--drop-path", type=float, default=None)
    group = parser.add_argument_group("Model EMA")
    group.add_argument("--model-ema", action="store_true")
    group.add_argument("--model-ema-decay", type=float, default=0.9998)
    group.add_argument("--model-ema-force-cpu", action="store_true")
    group = parser.add_argument_group("Precision")
    group.add_argument("--amp", action="store_true", help="automatic mixed precision (torch.amp)")
    group.add_argument("--apex-amp", action="store_true", help="alias of --amp (NVIDIA apex is not used)")
    group.add_argument("--native-amp", action="store_true", help="alias of --amp")
    group.add_argument("--amp-dtype", default=None, choices=["float16", "bfloat16"],
                       help="default: float16 on CUDA, bfloat16 on CPU")
    group = parser.add_argument_group("Miscellaneous")
    group.add_argument("-j", "--workers", type=int, default=4)
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--log-interval", type=int, default=50)
    group.add_argument("--checkpoint-hist", type=int, default=10)
    group.add_argument("--output", default="", help="parent folder of the run folder (default ./output/train)")
    group.add_argument("--experiment", default="", help="run folder name (default: date-model-size)")
    group.add_argument("--eval-metric", default="top1")
    group.add_argument("--pin-mem", action="store_true")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        with open(known.config) as f:
            parser.set_defaults(**yaml.safe_load(f))
    return parser.parse_args(argv)


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, device, lr_scheduler, amp_ctx, loss_scaler,
                    model_ema, mixup_fn):
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch and mixup_fn is not None:
        mixup_fn.mixup_enabled = False
    model.train()
    losses = utils.AverageMeter()
    num_updates = epoch * len(loader)
    start = time.time()
    for idx, (x, target) in enumerate(loader):
        x, target = x.to(device), target.to(device)
        if mixup_fn is not None:
            x, target = mixup_fn(x, target)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_ctx():
            loss = loss_fn(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=model.parameters())
        else:
            loss.backward()
            if args.clip_grad is not None:
                utils.dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        num_updates += 1
        losses.update(loss.item(), x.size(0))
        if args.sched_on_updates:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses.avg)
        if utils.is_primary(args) and (idx % args.log_interval == 0 or idx == len(loader) - 1):
            elapsed = time.time() - start
            rate = (idx + 1) * x.size(0) * args.world_size / max(elapsed, 1e-9)
            eta = elapsed / (idx + 1) * (len(loader) - idx - 1)
            _logger.info(
                f"Train: {epoch} [{idx + 1:>4d}/{len(loader)}] loss {losses.val:.4f} ({losses.avg:.4f}) "
                f"lr {optimizer.param_groups[0]['lr']:.3e} {rate:.1f} img/s ETA {eta:.0f}s"
            )
    loss = torch.tensor(losses.avg, device=device)
    if args.distributed:
        loss = utils.reduce_tensor(loss, args.world_size)
    return {"loss": loss.item()}


def evaluate(model, loader, args, device, amp_ctx):
    loss_fn = nn.CrossEntropyLoss()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top1 hits, top5 hits, count
    for logits, target in predict(model, loader, device, amp_ctx, args.channels_last):
        top1, topk = utils.accuracy(logits, target, topk=(1, min(5, logits.shape[1])))
        n = target.size(0)
        totals += torch.tensor([loss_fn(logits, target).item() * n, top1.item() * n / 100, topk.item() * n / 100, n],
                               device=device, dtype=torch.float64)
    if args.distributed:
        torch.distributed.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def plot_curves(summary_csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(summary_csv) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [float(r["train_loss"]) for r in rows], label="train")
    ax1.plot(epochs, [float(r["eval_loss"]) for r in rows], label="val")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend()
    ax2.plot(epochs, [float(r["eval_top1"]) for r in rows], label="top-1")
    ax2.plot(epochs, [float(r["eval_top5"]) for r in rows], label="top-5")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("accuracy (%)"), ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None):
    utils.setup_default_logging()
    args = parse_args(argv)
    if args.dist_backend is None:
        args.dist_backend = "nccl" if args.device.startswith("cuda") else "gloo"
    device = utils.init_distributed_device(args)
    if args.distributed and utils.is_primary(args):
        _logger.info(f"distributed: {args.world_size} processes, backend {args.dist_backend}, device {device.type}")
    utils.random_seed(args.seed, args.rank)
    try:
        train_root = check_image_folder(args.data_dir, args.train_split)
        check_image_folder(args.data_dir, args.val_split)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    num_classes = args.num_classes or sum(1 for p in train_root.iterdir() if p.is_dir())

    model_kwargs = dict(num_classes=num_classes, drop_rate=args.drop)
    if args.drop_path is not None:
        model_kwargs["drop_path_rate"] = args.drop_path
    if args.img_size is not None:
        model_kwargs["img_size"] = args.img_size
    model = create_model(args.model, **model_kwargs)
    if args.initial_checkpoint:
        load_checkpoint(model, args.initial_checkpoint, filter_fn=checkpoint_filter_fn, strict=False,
                        weights_only=False)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))

    amp_ctx, amp_dtype = resolve_amp(args, device)
    loss_scaler = utils.NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 else None

    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    start_epoch = 0
    if args.resume:
        start_epoch = resume_checkpoint(
            model, args.resume, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=utils.is_primary(args), weights_only=False,
        ) or 0
    model_ema = None
    if args.model_ema:
        model_ema = utils.ModelEmaV3(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)
        if args.resume:
            load_checkpoint(model_ema.module, args.resume, use_ema=True, weights_only=False)
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)

    dataset_train = create_dataset("", root=args.data_dir, split=args.train_split, is_training=True)
    dataset_eval = create_dataset("", root=args.data_dir, split=args.val_split, is_training=False)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
    common = dict(mean=data_config["mean"], std=data_config["std"], num_workers=args.workers, distributed=args.distributed,
                  pin_memory=args.pin_mem, device=device, use_prefetcher=False, persistent_workers=args.workers > 0)
    loader_train = create_loader(
        dataset_train, input_size=data_config["input_size"], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation="random" if not args.interpolation else args.interpolation, **common,
    )
    loader_eval = create_loader(
        dataset_eval, input_size=data_config["input_size"], batch_size=args.batch_size, is_training=False,
        interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"], **common,
    )
    if mixup_fn is not None:
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()

    updates_per_epoch = len(loader_train)
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    saver = output_dir = None
    if utils.is_primary(args):
        name = args.experiment or "-".join([time.strftime("%Y%m%d-%H%M%S"), safe_model_name(args.model), str(data_config["input_size"][-1])])
        output_dir = Path(utils.get_outdir(args.output or "./output/train", name))
        saver = utils.CheckpointSaver(
            model=model, optimizer=optimizer, args=args, model_ema=model_ema, amp_scaler=loss_scaler,
            checkpoint_dir=str(output_dir), recovery_dir=str(output_dir), decreasing=args.eval_metric == "loss",
            max_history=args.checkpoint_hist,
        )
        with open(output_dir / "args.yaml", "w") as f:
            yaml.safe_dump(vars(args), f)
        _logger.info(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; output in {output_dir}")

    best = None
    for epoch in range(start_epoch, num_epochs):
        if args.distributed and hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(epoch, model, loader_train, optimizer, train_loss_fn, args, device, lr_scheduler,
                                        amp_ctx, loss_scaler, model_ema, mixup_fn)
        eval_metrics = evaluate(model, loader_eval, args, device, amp_ctx)
        if model_ema is not None:
            ema_metrics = evaluate(model_ema.module, loader_eval, args, device, amp_ctx)
            eval_metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
        if saver is not None:
            _logger.info(f"Epoch {epoch}: train loss {train_metrics['loss']:.4f}, val loss {eval_metrics['loss']:.4f}, "
                         f"top-1 {eval_metrics['top1']:.2f}, top-5 {eval_metrics['top5']:.2f}")
            utils.update_summary(epoch, train_metrics, eval_metrics, filename=output_dir / "summary.csv",
                                 lr=optimizer.param_groups[0]["lr"], write_header=not (output_dir / "summary.csv").exists())
            plot_curves(output_dir / "summary.csv", output_dir / "curves.png")
            best = saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
    if best is not None and best[0] is not None:
        _logger.info(f"Best {args.eval_metric}: {best[0]:.2f} (epoch {best[1]})")
    if args.distributed:
        torch.distributed.destroy_process_group()
    return output_dir


if __name__ == "__main__":
    main()
