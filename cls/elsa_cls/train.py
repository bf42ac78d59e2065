"""Train an ELSA-Swin (or any timm model) on an ImageFolder dataset, with the original ELSA recipe's
defaults (timm 0.4.9's): a 10-epoch cool-down, a fixed-decay EMA, weight decay on every matrix.

Built on timm's data, augmentation, mixup, optimizer, scheduler, EMA and checkpoint factories, fed by
timm's prefetcher (uint8 batches, mixup in the collate, normalisation and random erasing on the device).
Run on one process, or on several with torchrun (distributed_train.sh) or srun (slurm_train.sh): NCCL on
GPUs, gloo on CPU. SIGTERM or SIGUSR1 saves a resumable checkpoint and exits with code 75.

    python cls/train.py <DATA> --model elsa_swin_tiny --epochs 300 -b 128 --opt adamw --lr 1e-3 ...
"""

import argparse
import csv
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import yaml
from timm import utils
from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

import elsa_swin
from elsa_op import ELSAAttention
from elsa_swin import CheckpointError, load_checkpoint_file, load_weights
from elsa_swin.files import NoSpaceError, atomic_write_bytes, atomic_write_text

from .data import DatasetError, ImageFolderDataset, check_image_folder
from .inference import predict, resolve_amp
from .preempt import EXIT_PREEMPTED, StopRequest, reseed, slurm_rendezvous
from .saver import RunSaver

SUMMARY = "summary.csv"

_logger = logging.getLogger("train")

# The original's train.py flags that cannot apply here: accepted at their default (so that its command
# lines and args.yaml files still parse), refused with the reason otherwise. dest -> (default, reason).
_TOKEN_LABEL = "token labelling needs the tlt package's dense label maps; ELSA's recipe does not use them"
_AUGMIX = "AugMix splits are not supported (ELSA's recipe does not use them)"
REFUSED: dict[str, tuple[Any, str]] = {
    "pretrained": (False, "no weights are downloaded: pass a file with --initial-checkpoint"),
    "aug_splits": (0, _AUGMIX),
    "jsd": (False, _AUGMIX),
    "resplit": (False, _AUGMIX),
    "split_bn": (False, _AUGMIX),
    "bn_tf": (False, "TensorFlow BatchNorm defaults were a timm 0.4 EfficientNet option that timm 1.0 dropped"),
    "tta": (0, "test-time augmentation needs an oversampling loader that the trainer does not build"),
    "torchscript": (False, "training runs eager or --torchcompile models, not TorchScript"),
    "token_label": (False, _TOKEN_LABEL),
    "token_label_data": ("", _TOKEN_LABEL),
    "token_label_size": (1, _TOKEN_LABEL),
    "dense_weight": (0.5, _TOKEN_LABEL),
    "cls_weight": (1.0, _TOKEN_LABEL),
    "ground_truth": (False, _TOKEN_LABEL),
}
IMAGE_FOLDER_NAMES = ("", "folder", "imagefolder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="", metavar="FILE", help="YAML file whose keys set argument defaults")
    group = parser.add_argument_group("Dataset parameters")
    group.add_argument("data_dir", metavar="DIR", help="dataset root holding train/ and val/ class folders")
    group.add_argument("--dataset", "-d", default="", help="only ImageFolder datasets: '' or 'folder'")
    group.add_argument("--train-split", default="train")
    group.add_argument("--val-split", default="val", help="'validation' falls back to 'val', as in timm 0.4")
    group = parser.add_argument_group("Model parameters")
    group.add_argument("--model", default="elsa_swin_tiny")
    group.add_argument("--pretrained", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--initial-checkpoint", default="", help="weights to start from (ours or the original's)")
    group.add_argument("--finetune", default="", help="the original's name for --initial-checkpoint")
    group.add_argument(
        "--resume",
        default="",
        help="checkpoint to resume model, optimizer, scaler, EMA, epoch and step from; 'auto': the run "
        "folder's last.pth.tar if there is one (needs --experiment), else start afresh",
    )
    group.add_argument("--no-resume-opt", action="store_true", help="with --resume, restore the model only")
    group.add_argument("--num-classes", type=int, default=None, help="default: the number of class folders")
    group.add_argument("--gp", default=None, help="global pool of the model (ELSA-Swin: avg)")
    group.add_argument("--img-size", type=int, default=None)
    group.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"))
    group.add_argument("--interpolation", default="", help="evaluation resize interpolation (model default)")
    group.add_argument("--crop-pct", type=float, default=None)
    group.add_argument("--mean", type=float, nargs=3, default=None)
    group.add_argument("--std", type=float, nargs=3, default=None)
    group.add_argument("-b", "--batch-size", type=int, default=128, help="per process")
    group.add_argument(
        "-vb", "--validation-batch-size-multiplier", type=int, default=1, help="evaluation batch = this x -b"
    )
    group.add_argument("--validation-batch-size", type=int, default=None, help="evaluation batch (overrides -vb)")
    group.add_argument("--grad-checkpointing", action="store_true")
    group.add_argument("--channels-last", action="store_true")
    group.add_argument("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile backend")
    group.add_argument("--torchscript", action="store_true", help=argparse.SUPPRESS)
    group = parser.add_argument_group("Optimizer parameters")
    group.add_argument("--opt", default="adamw")
    group.add_argument("--opt-eps", type=float, default=None)
    group.add_argument("--opt-betas", type=float, nargs="+", default=None)
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument(
        "--weight-decay-groups",
        default="timm0.4",
        choices=["timm0.4", "timm1"],
        help="timm0.4 (the original's): only 1-D parameters and biases skip weight decay; timm1: also the "
        "model's no_weight_decay() (ELSA-Swin: relative-position tables and ghost kernels)",
    )
    group.add_argument("--clip-grad", type=float, default=None)
    group.add_argument("--clip-mode", default="norm")
    group.add_argument("--layer-decay", type=float, default=None, help="timm 1.0's layer-wise LR decay")
    group = parser.add_argument_group("Learning rate schedule parameters")
    group.add_argument("--sched", default="cosine")
    group.add_argument("--sched-on-updates", action="store_true")
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--warmup-lr", type=float, default=1e-6)
    group.add_argument("--min-lr", type=float, default=1e-5)
    group.add_argument("--epochs", type=int, default=300)
    group.add_argument("--start-epoch", type=int, default=None)
    group.add_argument("--warmup-epochs", type=int, default=20)
    group.add_argument(
        "--cooldown-epochs", type=int, default=10, help="epochs at --min-lr after --epochs (timm 1.0's default: 0)"
    )
    group.add_argument("--decay-epochs", type=float, default=90)
    group.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270])
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1)
    group.add_argument("--patience-epochs", type=int, default=10)
    group.add_argument("--lr-cycle-mul", type=float, default=1.0)
    group.add_argument("--lr-cycle-decay", type=float, default=0.5)
    group.add_argument("--lr-cycle-limit", type=int, default=1)
    group.add_argument("--lr-k-decay", type=float, default=1.0)
    group.add_argument("--lr-noise", type=float, nargs="+", default=None)
    group.add_argument("--lr-noise-pct", type=float, default=0.67)
    group.add_argument("--lr-noise-std", type=float, default=1.0)
    group.add_argument("--warmup-prefix", action="store_true")
    group = parser.add_argument_group("Augmentation and regularization parameters")
    group.add_argument("--no-aug", action="store_true")
    group.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0])
    group.add_argument("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0])
    group.add_argument("--hflip", type=float, default=0.5)
    group.add_argument("--vflip", type=float, default=0.0)
    group.add_argument("--color-jitter", type=float, default=0.4)
    group.add_argument("--aa", default=None, help='AutoAugment policy, e.g. "rand-m9-mstd0.5-inc1"')
    group.add_argument("--aug-splits", type=int, default=0, help=argparse.SUPPRESS)
    group.add_argument("--jsd", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    group.add_argument("--remode", default="pixel", help="random erasing mode")
    group.add_argument("--recount", type=int, default=1)
    group.add_argument("--resplit", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--mixup", type=float, default=0.0)
    group.add_argument("--cutmix", type=float, default=0.0)
    group.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    group.add_argument("--mixup-prob", type=float, default=1.0)
    group.add_argument("--mixup-switch-prob", type=float, default=0.5)
    group.add_argument("--mixup-mode", default="batch")
    group.add_argument("--mixup-off-epoch", type=int, default=0)
    group.add_argument("--smoothing", type=float, default=0.1)
    group.add_argument("--train-interpolation", default="random", help="training resize interpolation")
    group.add_argument(
        "--drop", type=float, default=0.0, help="dropout; ELSA-Swin: after the patch embedding and in attention and MLP"
    )
    group.add_argument("--drop-connect", type=float, default=None, help="former name of --drop-path")
    group.add_argument("--drop-path", type=float, default=None)
    group.add_argument("--drop-block", type=float, default=None, help="for models with DropBlock layers")
    group = parser.add_argument_group("BatchNorm parameters (models that have BatchNorm)")
    group.add_argument("--bn-tf", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--bn-momentum", type=float, default=None)
    group.add_argument("--bn-eps", type=float, default=None)
    group.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    group.add_argument(
        "--dist-bn", default="", choices=["", "broadcast", "reduce"], help="share BatchNorm statistics after each epoch"
    )
    group.add_argument("--split-bn", action="store_true", help=argparse.SUPPRESS)
    group = parser.add_argument_group("Model EMA")
    group.add_argument("--model-ema", action="store_true")
    group.add_argument("--model-ema-decay", type=float, default=0.99992)
    group.add_argument(
        "--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU; it is then not evaluated"
    )
    group.add_argument(
        "--model-ema-v3",
        action="store_true",
        help="timm 1.0's ModelEmaV3 as its train.py steps it (the first update copies the model) instead of "
        "the original's fixed decay (ModelEmaV2)",
    )
    group.add_argument("--model-ema-warmup", action="store_true", help="ModelEmaV3 with a warming-up decay")
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
    group.add_argument(
        "--recovery-interval", type=int, default=0, help="also save a resumable last.pth.tar every N steps"
    )
    group.add_argument("--checkpoint-hist", type=int, default=10)
    group.add_argument("--save-images", action="store_true", help="save the input batch at each log line")
    group.add_argument("--output", default="", help="parent folder of the run folder (default ./output/train)")
    group.add_argument("--experiment", default="", help="run folder name (default: date-model-size)")
    group.add_argument("--eval-metric", default="top1")
    group.add_argument("--pin-mem", action="store_true")
    group.add_argument(
        "--no-prefetcher",
        action="store_true",
        help="normalise and random-erase in the loader workers (float32 batches, erasing before mixup)",
    )
    group.add_argument("--use-multi-epochs-loader", action="store_true")
    group.add_argument(
        "--skip-nonfinite-loss",
        action="store_true",
        help="skip a step whose loss is NaN or infinite instead of stopping",
    )
    group.add_argument("--tta", type=int, default=0, help=argparse.SUPPRESS)
    group.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by torch.distributed.launch")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    group = parser.add_argument_group("Token labelling (not supported)")
    group.add_argument("--token-label", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--token-label-data", default="", help=argparse.SUPPRESS)
    group.add_argument("--token-label-size", type=int, default=1, help=argparse.SUPPRESS)
    group.add_argument("--dense-weight", type=float, default=0.5, help=argparse.SUPPRESS)
    group.add_argument("--cls-weight", type=float, default=1.0, help=argparse.SUPPRESS)
    group.add_argument("--ground-truth", action="store_true", help=argparse.SUPPRESS)
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
        ("-vb/--validation-batch-size-multiplier", args.validation_batch_size_multiplier, 1),
        ("-j/--workers", args.workers, 0),
        ("--checkpoint-hist", args.checkpoint_hist, 1),
        ("--log-interval", args.log_interval, 1),
        ("--cooldown-epochs", args.cooldown_epochs, 0),
        ("--recovery-interval", args.recovery_interval, 0),
    ):
        if value < least:
            raise SystemExit(f"error: {flag} must be at least {least}, got {value}")
    for dest, (default, reason) in REFUSED.items():
        if getattr(args, dest) != default:
            raise SystemExit(f"error: --{dest.replace('_', '-')} is not supported: {reason}")
    if args.dataset.lower() not in IMAGE_FOLDER_NAMES:
        raise SystemExit(
            f"error: --dataset {args.dataset} is not supported: only ImageFolder folders are read "
            "(<root>/<split>/<class>/<image>)"
        )
    if args.resume == "auto" and not args.experiment:
        raise SystemExit("error: --resume auto needs --experiment: the run folder it looks in")
    if args.finetune:
        if args.initial_checkpoint:
            raise SystemExit("error: --finetune is the original's name for --initial-checkpoint: give only one")
        args.initial_checkpoint = args.finetune
    if args.drop_connect is not None:
        if args.drop_path is not None:
            raise SystemExit("error: --drop-connect is the former name of --drop-path: give only one")
        _logger.warning("--drop-connect is the former name of --drop-path")
        args.drop_path = args.drop_connect
    if args.model_ema_warmup:
        args.model_ema_v3 = True
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


# ---- the recipe's parts (each used by run_training and held to the original by test_cls_recipe.py) ----
def build_model(args, num_classes: int) -> nn.Module:
    """The model with --drop, --drop-path and the other model options.

    For ELSA-Swin, --drop acts as in the original (cls/models/elsa_swin.py, lines 445, 462, 229 and 234;
    cls/models/elsa/elsa.py, lines 260-263 and 270-273): dropout after the patch embedding, in every MLP and after the
    window attention's projection, but not after the ELSA attention's projection nor before the head.
    For other timm models it is timm's ``drop_rate``."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes)
    is_elsa = args.model in timm.list_models("elsa_swin*")
    if is_elsa:
        kwargs.update(pos_drop_rate=args.drop, proj_drop_rate=args.drop)
    else:
        kwargs.update(drop_rate=args.drop)
    optional = dict(
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        img_size=args.img_size or (args.input_size[-1] if args.input_size else None),
    )
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    try:
        model = create_model(args.model, **kwargs)
    except TypeError as e:
        raise SystemExit(f"error: {args.model} does not take one of the options given ({e})") from None
    if is_elsa:
        for module in model.modules():
            if isinstance(module, ELSAAttention):
                module.proj_drop.p = 0.0
    return model


def original_no_weight_decay(model: nn.Module) -> set[str]:
    """Names that timm 0.4's optimizer factory keeps out of weight decay beyond 1-D parameters and biases:
    the exact names in ``model.no_weight_decay()``. The original's ELSA-Swin names only
    ``absolute_pos_embed`` (cls/models/elsa_swin.py, line 489), a parameter ours does not have."""
    if isinstance(model, elsa_swin.ELSASwinTransformer):
        return {"absolute_pos_embed"}
    return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()


def build_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """timm's optimizer; its weight-decay groups as timm 0.4's factory builds them (``--weight-decay-groups
    timm0.4``: decay all but 1-D parameters, ``.bias`` and the exact no-decay names) or as timm 1.0's."""
    kwargs = optimizer_kwargs(cfg=args)
    if args.weight_decay_groups == "timm1" or args.layer_decay is not None or not args.weight_decay:
        return create_optimizer_v2(model, **kwargs)
    skip = original_no_weight_decay(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if len(param.shape) == 1 or name.endswith(".bias") or name in skip else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": args.weight_decay}]
    return create_optimizer_v2(groups, **kwargs)


def build_scheduler(optimizer, args, updates_per_epoch: int):
    """timm's scheduler and the number of epochs to run (--epochs plus --cooldown-epochs for cosine)."""
    return create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)


def build_ema(model: nn.Module, args):
    """The original's ModelEmaV2 (decay fixed from the first update), or with --model-ema-v3 timm 1.0's
    ModelEmaV3 as timm's train.py steps it; on the CPU with --model-ema-force-cpu."""
    device = "cpu" if args.model_ema_force_cpu else None
    if args.model_ema_v3:
        return utils.ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup, device=device)
    return utils.ModelEmaV2(model, decay=args.model_ema_decay, device=device)


def build_mixup(args, num_classes: int, prefetcher: bool):
    """(collate_fn, mixup_fn): FastCollateMixup mixing uint8 batches in the loader with the prefetcher, as
    the original; timm's Mixup on float batches in the training loop without it."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None, None
    kwargs = dict(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=num_classes,
    )
    return (FastCollateMixup(**kwargs), None) if prefetcher else (None, Mixup(**kwargs))


def build_loss(args, mixup: bool) -> nn.Module:
    """Soft-target cross-entropy on mixed, smoothed targets (the original's loss); without mixup, label
    smoothing cross-entropy, which is the same loss on one-hot targets."""
    if mixup:
        return SoftTargetCrossEntropy()
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def build_loaders(args, dataset_train, dataset_eval, data_config, device, collate_fn):
    """The training and evaluation loaders; with the prefetcher (default) batches leave the workers as
    uint8 and are normalised (and the training ones randomly erased) on ``device``."""
    prefetcher = not args.no_prefetcher
    common = dict(
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=args.workers,
        distributed=args.distributed,
        pin_memory=args.pin_mem,
        device=device,
        use_prefetcher=prefetcher,
        persistent_workers=args.workers > 0,
    )
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config["interpolation"]
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
        interpolation=train_interpolation,
        collate_fn=collate_fn,
        use_multi_epochs_loader=args.use_multi_epochs_loader,
        **common,
    )
    loader_eval = create_loader(
        dataset_eval,
        input_size=data_config["input_size"],
        batch_size=args.validation_batch_size or args.validation_batch_size_multiplier * args.batch_size,
        is_training=False,
        interpolation=data_config["interpolation"],
        crop_pct=data_config["crop_pct"],
        **common,
    )
    return loader_train, loader_eval


# ---- training --------------------------------------------------------------------------------
class Preempted(Exception):
    """Raised out of the epoch loop when a stop signal asked the run to end after a step."""


def _any_rank(flags: list[bool], args, device) -> list[bool]:
    if not args.distributed:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _rank_losses(losses: utils.AverageMeter, args, device) -> list[tuple[float, int]]:
    """Each rank's running (loss sum, image count) of the epoch, for a resumed epoch to report the same loss."""
    mine = torch.tensor([losses.sum, losses.count], dtype=torch.float64, device=device)
    if not args.distributed:
        return [(losses.sum, losses.count)]
    every = [torch.zeros_like(mine) for _ in range(args.world_size)]
    torch.distributed.all_gather(every, mine)
    return [(t[0].item(), int(t[1].item())) for t in every]


def train_one_epoch(
    epoch,
    model,
    loader,
    optimizer,
    loss_fn,
    args,
    device,
    lr_scheduler,
    amp_ctx,
    loss_scaler,
    model_ema,
    mixup_fn,
    stop: StopRequest,
    save_partial=None,
    resume_step: dict | None = None,
    output_dir: Path | None = None,
):
    """One epoch; ``resume_step`` (from a checkpoint saved in the middle of this epoch) replays the loader
    to the step it stopped at. Raises :class:`Preempted` after saving when a stop signal came."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if not args.no_prefetcher and loader.mixup_enabled:
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False
    model.train()
    losses = utils.AverageMeter()
    first = 0
    if resume_step is not None:
        first = resume_step["step"]
        losses.sum, losses.count = resume_step["losses"][args.rank % len(resume_step["losses"])]
        losses.avg = losses.sum / max(losses.count, 1)
    num_updates = epoch * len(loader) + first
    reseed(args.seed, args.rank, epoch, -1)
    batches = iter(loader)
    for idx in range(first):  # the same batches, with the same randomness, as the run that was stopped
        next(batches)
        reseed(args.seed, args.rank, epoch, idx)
    start = time.time()
    for idx in range(first, len(loader)):
        x, target = next(batches)
        if args.no_prefetcher:
            x, target = x.to(device), target.to(device)
            if mixup_fn is not None:
                x, target = mixup_fn(x, target)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_ctx():
            loss = loss_fn(model(x), target)
        nonfinite, stopping = _any_rank([not torch.isfinite(loss).item(), stop.signal is not None], args, device)
        optimizer.zero_grad(set_to_none=True)
        if nonfinite:
            if not args.skip_nonfinite_loss:
                raise SystemExit(
                    f"error: non-finite loss ({loss.item()}) at epoch {epoch} step {idx}: stopping (lower --lr, "
                    "use --clip-grad, or pass --skip-nonfinite-loss to skip such steps)"
                )
            _logger.warning(f"non-finite loss ({loss.item()}) at epoch {epoch} step {idx}: step skipped")
        elif loss_scaler is not None:
            loss_scaler(
                loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=model.parameters()
            )
        else:
            loss.backward()
            if args.clip_grad is not None:
                utils.dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        if model_ema is not None and not nonfinite:
            if args.model_ema_v3:
                # timm's train.py counts this update before passing it: its decay warms up from step 1.
                model_ema.update(model, step=num_updates + 1)
            else:
                model_ema.update(model)
        num_updates += 1
        if not nonfinite:
            losses.update(loss.item(), x.size(0))
        if args.sched_on_updates:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses.avg)
        if utils.is_primary(args) and (idx % args.log_interval == 0 or idx == len(loader) - 1):
            elapsed = time.time() - start
            done = idx + 1 - first
            rate = done * x.size(0) * args.world_size / max(elapsed, 1e-9)
            eta = elapsed / done * (len(loader) - idx - 1)
            _logger.info(
                f"Train: {epoch} [{idx + 1:>4d}/{len(loader)}] loss {losses.val:.4f} ({losses.avg:.4f}) "
                f"lr {optimizer.param_groups[0]['lr']:.3e} {rate:.1f} img/s ETA {eta:.0f}s"
            )
            if args.save_images and output_dir is not None:
                import torchvision.utils

                torchvision.utils.save_image(x, output_dir / f"train-batch-{idx}.jpg", padding=0, normalize=True)
        reseed(args.seed, args.rank, epoch, idx)
        last = idx == len(loader) - 1
        recover = args.recovery_interval and (idx + 1) % args.recovery_interval == 0
        if (stopping or recover) and not last and save_partial is not None:
            # The loader's length and the process count let a resume tell whether it replays the same batches.
            step_state = dict(epoch=epoch, step=idx + 1, steps=len(loader), world_size=args.world_size)
            save_partial(dict(step_state, losses=_rank_losses(losses, args, device)))
        if stopping and not last:
            raise Preempted(f"epoch {epoch} step {idx + 1}")
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
        step = state.get("resume_step")
        where = f"epoch {start_epoch}" + (f" step {step['step']}" if step else "")
        _logger.info(f"resumed from {args.resume} at {where}")
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
            f"--resume {output_dir / 'last.pth.tar'} (or --resume auto), or pick another --experiment"
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
    val_split = args.val_split
    if val_split == "validation" and not (Path(args.data_dir) / val_split).is_dir():
        val_split = args.val_split = "val"  # timm 0.4's create_dataset looks for val/ too
    try:
        train_dir = check_image_folder(args.data_dir, args.train_split)
        val_dir = check_image_folder(args.data_dir, val_split)
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
    slurm_rendezvous()
    stop = StopRequest().install()
    try:
        return _run(args, stop)
    finally:
        stop.uninstall()


def _run(args, stop: StopRequest):
    device = utils.init_distributed_device(args)
    if args.distributed and utils.is_primary(args):
        _logger.info(f"distributed: {args.world_size} processes, backend {args.dist_backend}, device {device.type}")
    utils.random_seed(args.seed, args.rank)
    run_folder = Path(args.output or "./output/train") / args.experiment if args.experiment else None
    if args.resume == "auto":
        assert run_folder is not None
        last = run_folder / "last.pth.tar"
        args.resume = str(last) if last.is_file() else ""
        if utils.is_primary(args):
            _logger.info(f"--resume auto: {'resuming from ' + args.resume if args.resume else 'starting afresh'}")
    if run_folder is not None and utils.is_primary(args):  # only a named run folder can hold an earlier run
        prepare_run_folder(run_folder, args)
    dataset_train, dataset_eval = build_datasets(args)
    class_names = dataset_train.class_names
    num_classes = args.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise SystemExit(
            f"error: --num-classes {num_classes}, but {args.data_dir}/{args.train_split} has "
            f"{len(class_names)} class folders"
        )

    model = build_model(args, num_classes)
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
    if args.distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))

    amp_ctx, amp_dtype = resolve_amp(args, device)
    loss_scaler = utils.NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 else None

    optimizer = build_optimizer(model, args)
    start_epoch = 0
    resume_step = None
    if resume_state is not None:
        start_epoch = resume(model, optimizer, loss_scaler, resume_state, args)
        resume_step = resume_state.get("resume_step")
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    model_ema = None
    if args.model_ema:
        # From the weights DDP has just given every rank (rank 0's), so that all ranks hold the same EMA.
        model_ema = build_ema(model.module if args.distributed else model, args)
        if resume_state is not None and "state_dict_ema" in resume_state:
            try:
                load_weights(model_ema.module, resume_state, args.resume, use_ema=True)
            except CheckpointError as e:
                raise SystemExit(f"error: {e}") from None
        if args.model_ema_force_cpu and utils.is_primary(args):
            _logger.info("--model-ema-force-cpu: the EMA is kept on the CPU and not evaluated (as in the original)")
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)

    collate_fn, mixup_fn = build_mixup(args, num_classes, prefetcher=not args.no_prefetcher)
    loader_train, loader_eval = build_loaders(args, dataset_train, dataset_eval, data_config, device, collate_fn)
    train_loss_fn = build_loss(args, mixup=collate_fn is not None or mixup_fn is not None)

    updates_per_epoch = len(loader_train)
    if updates_per_epoch == 0:
        raise SystemExit(
            f"error: -b {args.batch_size} is larger than the {len(dataset_train)} training images "
            "shared by the processes: no full batch to train on"
        )
    lr_scheduler, num_epochs = build_scheduler(optimizer, args, updates_per_epoch)
    if args.start_epoch is not None:
        start_epoch, resume_step = args.start_epoch, None
    if start_epoch >= num_epochs and not args.resume:
        raise SystemExit(
            f"error: the run starts at epoch {start_epoch}, but --epochs {args.epochs} "
            f"(and the schedule's cool-down) ends at {num_epochs}: nothing to train"
        )
    if resume_step is not None and resume_step["epoch"] != start_epoch:
        resume_step = None
    if resume_step is not None and (resume_step.get("steps"), resume_step.get("world_size")) != (
        updates_per_epoch,
        args.world_size,
    ):
        # Another batch size or process count: the stopped epoch's batches cannot be replayed.
        _logger.warning(
            f"the checkpoint stopped at step {resume_step['step']} of {resume_step.get('steps')} with "
            f"{resume_step.get('world_size')} processes; this run has {updates_per_epoch} steps per epoch and "
            f"{args.world_size} processes: epoch {start_epoch} starts again from its first step"
        )
        resume_step = None
    if start_epoch > 0 or resume_step is not None:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch + (resume_step or {}).get("step", 0))
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
        _logger.info(
            f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; {num_epochs} epochs "
            f"({args.epochs} + {num_epochs - args.epochs} cool-down); output in {output_dir}"
        )

    def save_partial(step_state: dict) -> None:
        if saver is not None:
            saver.save_partial(step_state)

    if start_epoch >= num_epochs and utils.is_primary(args):
        _logger.info(f"{args.resume} finished the run (epoch {start_epoch - 1} of {num_epochs}): nothing left to train")
    evaluate_ema = model_ema is not None and not args.model_ema_force_cpu
    best = None
    try:
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
                stop,
                save_partial,
                resume_step if epoch == start_epoch else None,
                output_dir if args.save_images else None,
            )
            if args.distributed and args.dist_bn:
                utils.distribute_bn(model, args.world_size, args.dist_bn == "reduce")
            eval_metrics = evaluate(model, loader_eval, args, device, amp_ctx)
            if evaluate_ema:
                if args.distributed and args.dist_bn:
                    utils.distribute_bn(model_ema, args.world_size, args.dist_bn == "reduce")
                # As the original (and timm): the EMA's metrics are the run's, model_best is the best EMA.
                raw = eval_metrics
                eval_metrics = evaluate(model_ema.module, loader_eval, args, device, amp_ctx)
                eval_metrics.update({f"raw_{k}": v for k, v in raw.items()})
            lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
            if saver is not None:
                _logger.info(
                    f"Epoch {epoch}: train loss {train_metrics['loss']:.4f}, val loss {eval_metrics['loss']:.4f}, "
                    f"top-1 {eval_metrics['top1']:.2f}, top-5 {eval_metrics['top5']:.2f}"
                    + (" (EMA)" if evaluate_ema else "")
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
            if _any_rank([stop.signal is not None], args, device)[0] and epoch + 1 < num_epochs:
                raise Preempted(f"the end of epoch {epoch}")
    except Preempted as where:
        if args.distributed:
            torch.distributed.barrier()
        if utils.is_primary(args):
            _logger.warning(
                f"{stop.name or 'a stop signal'}: stopped after {where}, {output_dir}/last.pth.tar saved; "
                f"continue with --resume auto (exit code {EXIT_PREEMPTED})"
            )
        if args.distributed:
            torch.distributed.destroy_process_group()
        raise SystemExit(EXIT_PREEMPTED) from None
    if best is not None and best[0] is not None:
        _logger.info(f"Best {args.eval_metric}{' (EMA)' if evaluate_ema else ''}: {best[0]:.2f} (epoch {best[1]})")
    if args.distributed:
        torch.distributed.destroy_process_group()
    return output_dir


if __name__ == "__main__":
    main()
