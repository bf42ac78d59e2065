"""The parts of det/ and seg/ tools/train.py and tools/test.py that are the same: argument parsing,
config loading with the original's options mapped onto mmengine, and the Runner."""
import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from mmengine.config import Config, DictAction
from mmengine.runner import Runner


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", help="folder for logs and checkpoints (default ./work_dirs/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config keys, e.g. model.pretrained=<file> model.backbone.use_checkpoint=True")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a model with mmengine's Runner")
    parser.add_argument("config")
    parser.add_argument("--amp", action="store_true", help="mixed precision (the ELSA configs already use it)")
    parser.add_argument("--resume", nargs="?", const="auto", help="resume from a checkpoint, or the latest one")
    _add_common(parser)
    return parser


def test_parser(eval_help: str, extra: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.ArgumentParser:
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
        cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=pretrained)
    return cfg


def train(cfg: Config, args: argparse.Namespace) -> None:
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        if not Path(args.resume).is_file():
            raise SystemExit(f"error: checkpoint {args.resume} does not exist")
        cfg.resume, cfg.load_from = True, args.resume
    Runner.from_cfg(cfg).train()


def test(cfg: Config, args: argparse.Namespace) -> dict:
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"error: checkpoint {args.checkpoint} does not exist")
    cfg.load_from = args.checkpoint
    if args.out:
        cfg.test_evaluator = [cfg.test_evaluator] if isinstance(cfg.test_evaluator, dict) else list(cfg.test_evaluator)
        cfg.test_evaluator.append(dict(type="DumpResults", out_file_path=args.out))
    return Runner.from_cfg(cfg).test()


def add_plugin_path(tool_file: str) -> None:
    """Make the plugin package beside tools/ (and the repository root) importable for custom_imports."""
    here = Path(tool_file).resolve().parent.parent
    for path in (here, here.parent):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
