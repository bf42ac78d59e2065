"""Train an ELSA-Swin (or any timm model) on an ImageFolder dataset.

Built on timm's data, augmentation, mixup, optimizer, scheduler, EMA and checkpoint factories. Run on one
process, or on several with torchrun (see distributed_train.sh): NCCL on GPUs, gloo on CPU.

    python cls/train.py <DATA> --model elsa_swin_tiny --epochs 300 -b 128 --opt adamw --lr 1e-3 ...
"""

import argparse
import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from timm import utils
from timm.data import Mixup, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

import elsa_swin  # noqa: F401  (registers the ELSA-Swin models with timm)
from elsa_swin import CheckpointError, load_checkpoint_file, load_weights
from elsa_swin.files import NoSpaceError, atomic_write_bytes, atomic_write_text

from .data import DatasetError, ImageFolderDataset, check_image_folder
from .inference import predict, resolve_amp
from .saver import RunSaver

SUMMARY = "summary.csv"

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
    group.add_argument(
        "--amp-dtype", default=None, choices=["float16", "bfloat16"], help="default: float16 on CUDA, bfloat16 on CPU"
    )
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
    """Arguments, with defaults from ``-c config.yaml`` whose keys must all be known options; values
    that cannot work are refused in one line before anything starts."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise SystemExit(f"error: -c {path}: no such file")
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SystemExit(f"error: -c {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise SystemExit(f"error: -c {path} must map option names to values")
        options = {action.dest for action in parser._actions}
        unknown = sorted(str(k) for k in config if k not in options)
        if unknown:
            raise SystemExit(
                f"error: -c {path}: unknown options {', '.join(unknown)} (keys are option names "
                "with underscores, e.g. weight_decay)"
            )
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    for flag, value, least in (
        ("--epochs", args.epochs, 1),
        ("-b/--batch-size", args.batch_size, 1),
        ("-j/--workers", args.workers, 0),
        ("--checkpoint-hist", args.checkpoint_hist, 1),
        ("--log-interval", args.log_interval, 1),
    ):
        if value < least:
            raise SystemExit(f"error: {flag} must be at least {least}, got {value}")
    return args


def train_one_epoch(
    epoch, model, loader, optimizer, loss_fn, args, device, lr_scheduler, amp_ctx, loss_scaler, model_ema, mixup_fn
):
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
            loss_scaler(
                loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=model.parameters()
            )
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
    """Loss, top-1 and top-5 over the readable images of ``loader`` (unreadable ones come with target -1)."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top1 hits, top5 hits, count
    for logits, target in predict(model, loader, device, amp_ctx, args.channels_last):
        keep = target >= 0
        logits, target = logits[keep], target[keep]
        if not len(target):
            continue
        top1, topk = utils.accuracy(logits, target, topk=(1, min(5, logits.shape[1])))
        n = target.size(0)
        totals += torch.tensor(
            [loss_fn(logits, target).item(), top1.item() * n / 100, topk.item() * n / 100, n],
            device=device,
            dtype=torch.float64,
        )
    if args.distributed:
        torch.distributed.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    if n == 0:
        raise SystemExit(f"error: no image of {args.data_dir}/{args.val_split} could be read")
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def resume(model, optimizer, loss_scaler, state: dict, args) -> int:
    """Restore the model (and, unless --no-resume-opt, optimizer and loss scaler) from a train.py
    checkpoint; returns the epoch to start from."""
    if "state_dict" not in state or "epoch" not in state:
        raise SystemExit(f"error: --resume {args.resume} is not a train.py checkpoint (it has no state_dict and epoch)")
    try:
        load_weights(model, state, args.resume)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    if not args.no_resume_opt:
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        if loss_scaler is not None and loss_scaler.state_dict_key in state:
            loss_scaler.load_state_dict(state[loss_scaler.state_dict_key])
    # timm's saver (version 2) stores the epoch just finished.
    start_epoch = state["epoch"] + (1 if state.get("version", 1) > 1 else 0)
    if utils.is_primary(args):
        _logger.info(f"resumed from {args.resume} at epoch {start_epoch}")
    return start_epoch


def plot_curves(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [float(r["train_loss"]) for r in rows], label="train")
    ax1.plot(epochs, [float(r["eval_loss"]) for r in rows], label="val")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend()
    ax2.plot(epochs, [float(r["eval_top1"]) for r in rows], label="top-1")
    ax2.plot(epochs, [float(r["eval_top5"]) for r in rows], label="top-5")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("accuracy (%)"), ax2.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(png, image.getbuffer())


def prepare_run_folder(output_dir: Path, args) -> None:
    """A run folder holds one run: refuse to start another one in a folder that already has one, unless
    this run resumes from it; drop temporary files a killed save left behind."""
    if not output_dir.is_dir():
        return
    existing = [name for name in ("last.pth.tar", SUMMARY) if (output_dir / name).exists()]
    resumes_here = args.resume and Path(args.resume).resolve().parent == output_dir.resolve()
    if existing and not resumes_here:
        raise SystemExit(
            f"error: {output_dir} already holds a run ({', '.join(existing)}); continue it with "
            f"--resume {output_dir / 'last.pth.tar'}, or pick another --experiment"
        )
    for pattern in (".*.tmp", ".*.link"):  # what elsa_swin.files writes before renaming into place
        for stale in output_dir.glob(pattern):
            stale.unlink()


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def build_datasets(args) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The training and evaluation splits, both labelled through the training split's classes."""
    try:
        train_dir = check_image_folder(args.data_dir, args.train_split)
        val_dir = check_image_folder(args.data_dir, args.val_split)
        dataset_train = ImageFolderDataset(train_dir, is_training=True)
        dataset_eval = ImageFolderDataset(val_dir, class_names=dataset_train.class_names)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    return dataset_train, dataset_eval


def main(argv=None):
    try:
        return run_training(argv)
    except NoSpaceError as e:  # from any file of the run; the previous one is kept
        raise SystemExit(f"error: {e}") from None


def run_training(argv=None):
    utils.setup_default_logging()
    args = parse_args(argv)
    if args.dist_backend is None:
        args.dist_backend = "nccl" if args.device.startswith("cuda") else "gloo"
    device = utils.init_distributed_device(args)
    if args.distributed and utils.is_primary(args):
        _logger.info(f"distributed: {args.world_size} processes, backend {args.dist_backend}, device {device.type}")
    utils.random_seed(args.seed, args.rank)
    if args.experiment and utils.is_primary(args):  # only a named run folder can hold an earlier run
        prepare_run_folder(Path(args.output or "./output/train") / args.experiment, args)
    dataset_train, dataset_eval = build_datasets(args)
    class_names = dataset_train.class_names
    num_classes = args.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise SystemExit(
            f"error: --num-classes {num_classes}, but {args.data_dir}/{args.train_split} has "
            f"{len(class_names)} class folders"
        )

    model_kwargs = dict(num_classes=num_classes, drop_rate=args.drop)
    if args.drop_path is not None:
        model_kwargs["drop_path_rate"] = args.drop_path
    if args.img_size is not None:
        model_kwargs["img_size"] = args.img_size
    model = create_model(args.model, **model_kwargs)
    try:
        if args.initial_checkpoint:
            load_weights(model, load_checkpoint_file(args.initial_checkpoint), args.initial_checkpoint, strict=False)
        resume_state = load_checkpoint_file(args.resume) if args.resume else None
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
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
    if resume_state is not None:
        start_epoch = resume(model, optimizer, loss_scaler, resume_state, args)
    model_ema = None
    if args.model_ema:
        model_ema = utils.ModelEmaV3(
            model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None
        )
        if resume_state is not None and "state_dict_ema" in resume_state:
            try:
                load_weights(model_ema.module, resume_state, args.resume, use_ema=True)
            except CheckpointError as e:
                raise SystemExit(f"error: {e}") from None
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
    common = dict(
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=args.workers,
        distributed=args.distributed,
        pin_memory=args.pin_mem,
        device=device,
        use_prefetcher=False,
        persistent_workers=args.workers > 0,
    )
    loader_train = create_loader(
        dataset_train,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=True,
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation="random" if not args.interpolation else args.interpolation,
        **common,
    )
    loader_eval = create_loader(
        dataset_eval,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=False,
        interpolation=data_config["interpolation"],
        crop_pct=data_config["crop_pct"],
        **common,
    )
    if mixup_fn is not None:
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()

    updates_per_epoch = len(loader_train)
    if updates_per_epoch == 0:
        raise SystemExit(
            f"error: -b {args.batch_size} is larger than the {len(dataset_train)} training images "
            "shared by the processes: no full batch to train on"
        )
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch
    )
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    if start_epoch >= num_epochs and not args.resume:
        raise SystemExit(
            f"error: the run starts at epoch {start_epoch}, but --epochs {args.epochs} "
            f"(and the schedule's cool-down) ends at {num_epochs}: nothing to train"
        )
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    saver = output_dir = None
    if utils.is_primary(args):
        name = args.experiment or "-".join(
            [time.strftime("%Y%m%d-%H%M%S"), safe_model_name(args.model), str(data_config["input_size"][-1])]
        )
        output_dir = Path(utils.get_outdir(args.output or "./output/train", name))
        saver = RunSaver(
            model=model,
            optimizer=optimizer,
            args=args,
            model_ema=model_ema,
            amp_scaler=loss_scaler,
            checkpoint_dir=str(output_dir),
            recovery_dir=str(output_dir),
            decreasing=args.eval_metric == "loss",
            max_history=args.checkpoint_hist,
            class_names=class_names,
        )
        if resume_state is not None and Path(args.resume).resolve().parent == output_dir.resolve():
            # Finish what a kill may have interrupted after the checkpoint: its copies and summary.csv.
            saver.resume(resume_state, args.resume)
            saver.summary = [row for row in resume_state.get("summary", []) if row["epoch"] < start_epoch]
            if saver.summary:
                write_summary(output_dir / SUMMARY, saver.summary)
                plot_curves(saver.summary, output_dir / "curves.png")
        atomic_write_text(output_dir / "args.yaml", yaml.safe_dump(vars(args)))
        _logger.info(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; output in {output_dir}")

    if start_epoch >= num_epochs and utils.is_primary(args):
        _logger.info(f"{args.resume} finished the run (epoch {start_epoch - 1} of {num_epochs}): nothing left to train")
    best = None
    for epoch in range(start_epoch, num_epochs):
        if args.distributed and hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(
            epoch,
            model,
            loader_train,
            optimizer,
            train_loss_fn,
            args,
            device,
            lr_scheduler,
            amp_ctx,
            loss_scaler,
            model_ema,
            mixup_fn,
        )
        eval_metrics = evaluate(model, loader_eval, args, device, amp_ctx)
        if model_ema is not None:
            ema_metrics = evaluate(model_ema.module, loader_eval, args, device, amp_ctx)
            eval_metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
        if saver is not None:
            _logger.info(
                f"Epoch {epoch}: train loss {train_metrics['loss']:.4f}, val loss {eval_metrics['loss']:.4f}, "
                f"top-1 {eval_metrics['top1']:.2f}, top-5 {eval_metrics['top5']:.2f}"
            )
            saver.summary.append(
                {
                    "epoch": epoch,
                    **{f"train_{k}": v for k, v in train_metrics.items()},
                    **{f"eval_{k}": v for k, v in eval_metrics.items()},
                    "lr": optimizer.param_groups[0]["lr"],
                }
            )
            best = saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
            write_summary(output_dir / SUMMARY, saver.summary)
            plot_curves(saver.summary, output_dir / "curves.png")
    if best is not None and best[0] is not None:
        _logger.info(f"Best {args.eval_metric}: {best[0]:.2f} (epoch {best[1]})")
    if args.distributed:
        torch.distributed.destroy_process_group()
    return output_dir


if __name__ == "__main__":
    main()
