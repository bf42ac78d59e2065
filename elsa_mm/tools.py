"""The parts of det/ and seg/ tools/train.py and tools/test.py that are the same: argument parsing,
config loading with the original's options mapped onto mmengine, and the Runner."""

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.runner import Runner

from elsa_swin.checkpoint import CheckpointError, load_checkpoint_file

from .compat import allow_mmengine_checkpoints, mmengine_safe_globals, write_checkpoints_atomically


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", help="folder for logs and checkpoints (default ./work_dirs/<config name>)")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override config keys, e.g. model.pretrained=<file> model.backbone.use_checkpoint=True",
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a model with mmengine's Runner")
    parser.add_argument("config")
    parser.add_argument("--amp", action="store_true", help="mixed precision (the ELSA configs already use it)")
    parser.add_argument("--resume", nargs="?", const="auto", help="resume from a checkpoint, or the latest one")
    parser.add_argument(
        "--auto-scale-lr",
        action="store_true",
        help="scale the learning rate by the images per step (GPUs x images per GPU) over the config's "
        "auto_scale_lr.base_batch_size, the batch its learning rate was set for",
    )
    _add_common(parser)
    return parser


def test_parser(
    eval_help: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Test a checkpoint with mmengine's Runner")
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("--eval", nargs="+", help=eval_help)
    parser.add_argument("--out", help="dump the raw predictions to this pickle file")
    if extra is not None:
        extra(parser)
    _add_common(parser)
    return parser


def check_metrics(requested, known) -> list:
    """--eval's metric names, refused with a clear message when the evaluator does not know one."""
    unknown = sorted(set(requested) - set(known))
    if unknown:
        raise SystemExit(f"error: --eval {' '.join(unknown)}: the evaluator knows {', '.join(known)}")
    return list(requested)


def load_config(args: argparse.Namespace) -> Config:
    """Config with --cfg-options merged, the work dir set, and the original's ``model.pretrained`` turned
    into the backbone's ``init_cfg``. Errors name the file that is missing."""
    if not Path(args.config).is_file():
        raise SystemExit(f"error: config file {args.config} does not exist")
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(args.config).stem)
    pretrained = cfg.model.pop("pretrained", None)
    if pretrained:
        if not Path(pretrained).is_file():
            raise SystemExit(f"error: model.pretrained={pretrained} does not exist")
        check_checkpoint(pretrained)
        cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=pretrained)
    return cfg


def check_checkpoint(path: str) -> dict:
    """The checkpoint's contents; a missing, unreadable or unsafe file is refused in one line naming it,
    before the Runner starts."""
    try:
        return load_checkpoint_file(path, extra_safe_globals=mmengine_safe_globals())
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


def check_fits(model: torch.nn.Module, checkpoint: dict, path: str, config: str) -> None:
    """Refuse a checkpoint that does not hold the model's weights (mmengine would load what matches,
    warn deep in the log, and test random heads)."""
    if is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    state = checkpoint.get("state_dict", checkpoint)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # Load for real, so that the backbone's mapping of the original's names takes part; the Runner loads
    # the same weights again.
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise SystemExit(f"error: {path} does not fit the model of {config}: {'; '.join(shapes[:3]) or e}") from None
    if missing:
        raise SystemExit(
            f"error: {path} does not fit the model of {config}: {len(missing)} of "
            f"{len(model.state_dict())} weights are missing from it (e.g. {', '.join(missing[:3])})"
        )
    if unexpected:
        print_log(
            f"{path}: {len(unexpected)} weights the model does not use: {', '.join(unexpected[:5])}",
            logger="current",
            level=logging.WARNING,
        )


def train(cfg: Config, args: argparse.Namespace) -> None:
    allow_mmengine_checkpoints()
    write_checkpoints_atomically()
    for key in ("max_iters", "max_epochs"):
        value = (cfg.get("train_cfg") or {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SystemExit(f"error: train_cfg.{key}={value!r}: it must be a whole number of at least 1")
    if getattr(args, "auto_scale_lr", False):
        # mmengine's Runner does the scaling (world size x train_dataloader.batch_size / base_batch_size).
        auto = cfg.get("auto_scale_lr")
        base = auto.get("base_batch_size") if isinstance(auto, dict) else None
        if isinstance(base, bool) or not isinstance(base, int) or base < 1:
            raise SystemExit(
                f"error: --auto-scale-lr: {args.config} has no auto_scale_lr = dict(base_batch_size=...), "
                "the batch its learning rate was set for"
            )
        auto.enable = True
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        check_checkpoint(args.resume)
        cfg.resume, cfg.load_from = True, args.resume
    Runner.from_cfg(cfg).train()


def test(cfg: Config, args: argparse.Namespace) -> dict:
    allow_mmengine_checkpoints()
    write_checkpoints_atomically()
    checkpoint = check_checkpoint(args.checkpoint)
    cfg.load_from = args.checkpoint
    if args.out:
        cfg.test_evaluator = [cfg.test_evaluator] if isinstance(cfg.test_evaluator, dict) else list(cfg.test_evaluator)
        cfg.test_evaluator.append(dict(type="DumpResults", out_file_path=args.out))
    runner = Runner.from_cfg(cfg)
    check_fits(runner.model, checkpoint, args.checkpoint, args.config)
    del checkpoint
    return runner.test()
