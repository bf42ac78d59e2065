"""The parts of det/ and seg/ tools/train.py and tools/test.py that are the same: argument parsing,
config loading with the original's options mapped onto mmengine, distributed runs (on CPUs too), and the
Runner."""

import argparse
import datetime
import inspect
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict, DictAction
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
    parser.add_argument(
        "--launcher",
        choices=["none", "pytorch", "slurm", "mpi"],
        default="none",
        help="how the processes were started: tools/dist_*.sh (pytorch), tools/slurm_*.sh (slurm)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a model with mmengine's Runner")
    parser.add_argument("config")
    parser.add_argument("--amp", action="store_true", help="mixed precision (the ELSA configs already use it)")
    parser.add_argument(
        "--resume", "--resume-from", nargs="?", const="auto", help="resume from a checkpoint, or the latest one"
    )
    parser.add_argument("--load-from", help="start from this checkpoint's weights (not its schedule or optimizer)")
    parser.add_argument("--no-validate", action="store_true", help="do not evaluate during training")
    parser.add_argument("--seed", type=int, help="random seed (config's randomness.seed)")
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms (config's randomness.deterministic)"
    )
    gpus = parser.add_mutually_exclusive_group()
    gpus.add_argument("--gpus", type=int, help="the original's GPU count: one process trains on one GPU")
    gpus.add_argument("--gpu-ids", type=int, nargs="+", help="the original's GPU choice: one GPU per process")
    parser.add_argument("--options", nargs="+", action=DictAction, help="the original's name of --cfg-options")
    parser.set_defaults(options_mean="cfg_options")
    parser.add_argument(
        "--auto-scale-lr",
        action="store_true",
        help="scale the learning rate by the images per step (GPUs x images per GPU) over the config's "
        "auto_scale_lr.base_batch_size, the batch its learning rate was set for",
    )
    _add_common(parser)
    return parser


def test_parser(
    eval_help: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    options_mean: str = "eval_options",
) -> argparse.ArgumentParser:
    """The test tools' arguments. ``--options`` means what it meant in the original's tool of the same
    project: ``options_mean`` names the option it stands for (det: ``eval_options``, seg: ``cfg_options``)."""
    parser = argparse.ArgumentParser(description="Test a checkpoint with mmengine's Runner")
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("--eval", nargs="+", help=eval_help)
    parser.add_argument("--out", help="dump the raw predictions to this pickle file (.pkl or .pickle)")
    parser.add_argument(
        "--format-only",
        action="store_true",
        help="write the results in the dataset's submission format without scoring them (see --eval-options)",
    )
    parser.add_argument("--show", action="store_true", help="show each image with its predictions in a window")
    parser.add_argument("--show-dir", help="folder to save each image with its predictions drawn on it")
    parser.add_argument("--eval-options", nargs="+", action=DictAction, help="evaluator arguments, e.g. classwise=True")
    parser.add_argument(
        "--options", nargs="+", action=DictAction, help=f"the original's name of --{options_mean.replace('_', '-')}"
    )
    parser.set_defaults(options_mean=options_mean)
    parser.add_argument(
        "--gpu-collect",
        action="store_true",
        help="gather the processes' results through the communication backend, not files in --tmpdir",
    )
    parser.add_argument("--tmpdir", help="folder the processes' results are gathered in (default: a temporary one)")
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


def _fold_options(args: argparse.Namespace) -> None:
    """The original's deprecated ``--options`` into the option it stands for; both at once are refused."""
    options = getattr(args, "options", None)
    if not options:
        return
    dest = args.options_mean
    if getattr(args, dest, None):
        raise SystemExit(f"error: --options is the original's name of --{dest.replace('_', '-')}: give one of them")
    setattr(args, dest, options)


def load_config(args: argparse.Namespace) -> Config:
    """Config with --cfg-options merged, the work dir set, and the original's ``model.pretrained`` turned
    into the backbone's ``init_cfg``. Errors name the file that is missing."""
    if not Path(args.config).is_file():
        raise SystemExit(f"error: config file {args.config} does not exist")
    _fold_options(args)
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


def _slurm_environment() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM's variables, as mmengine's slurm
    launcher sets them (the first node of the job is the master; MASTER_ADDR / MASTER_PORT given win)."""
    missing = [v for v in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODELIST") if v not in os.environ]
    if missing:
        raise SystemExit(f"error: --launcher slurm: {', '.join(missing)} not set; start it with tools/slurm_*.sh")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ["SLURM_NODELIST"]
        try:
            hosts = subprocess.run(
                ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
            ).stdout.split()
        except (OSError, subprocess.CalledProcessError) as e:
            hosts, why = [], str(e)
        else:
            why = "no host"
        if not hosts:
            raise SystemExit(f"error: --launcher slurm: scontrol lists no host of {nodes} ({why}); set MASTER_ADDR")
        os.environ["MASTER_ADDR"] = hosts[0]
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def _sync_bn_to_bn(node) -> int:
    """Turns every ``SyncBN`` norm config under node into ``BN``; returns how many it changed."""
    changed = 0
    if isinstance(node, dict):
        if node.get("type") in ("SyncBN", "MMSyncBN"):
            node["type"] = "BN"
            changed += 1
        for value in node.values():
            changed += _sync_bn_to_bn(value)
    elif isinstance(node, list | tuple):
        for value in node:
            changed += _sync_bn_to_bn(value)
    return changed


def setup_distributed(cfg: Config) -> None:
    """Distributed runs on CPUs. mmengine's pytorch and slurm launchers bind each process to a CUDA device,
    and torch's SyncBatchNorm takes only GPU tensors. Without a GPU this joins the processes in a gloo group
    itself (the Runner then uses it), has the model wrapped in DistributedDataParallel without device ids,
    and builds BN where the config asks for SyncBN (each process normalises its own batch). With a GPU,
    mmengine does it all as usual."""
    if cfg.launcher == "none" or torch.cuda.is_available() or dist.is_initialized():
        return
    if cfg.launcher == "mpi":
        raise SystemExit("error: --launcher mpi needs GPUs; on CPUs start the processes with tools/dist_*.sh")
    if cfg.launcher == "slurm":
        _slurm_environment()
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise SystemExit(
            f"error: --launcher pytorch: {', '.join(missing)} not set; start it with tools/dist_train.sh or "
            "tools/dist_test.sh (torchrun)"
        )
    dist_cfg = (cfg.get("env_cfg") or {}).get("dist_cfg") or {}
    timeout = datetime.timedelta(seconds=dist_cfg.get("timeout", 1800))
    dist.init_process_group("gloo", timeout=timeout)
    wrapper = cfg.get("model_wrapper_cfg") or ConfigDict(
        type="MMDistributedDataParallel",
        broadcast_buffers=False,
        find_unused_parameters=cfg.get("find_unused_parameters", False),
    )
    # The Runner adds device_ids=[LOCAL_RANK] only where the config names none.
    wrapper["device_ids"] = None
    cfg.model_wrapper_cfg = wrapper
    converted = _sync_bn_to_bn(cfg.model)
    if converted:
        print_log(
            f"CPU distributed run (gloo, {dist.get_world_size()} processes): the model's {converted} SyncBN "
            "norm configs build BN, which normalises each process's batch alone",
            logger="current",
            level=logging.WARNING,
        )


def finish_distributed() -> None:
    """Leaves the process group, whoever made it. mmengine's Runner never does, and a gloo group left to the
    interpreter's exit can abort the process (``terminate called without an active exception``) after the run
    itself succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _check_gpus(args: argparse.Namespace) -> None:
    """The original's --gpus / --gpu-ids: mmengine trains on one GPU per process."""
    gpus, gpu_ids = getattr(args, "gpus", None), getattr(args, "gpu_ids", None)
    if gpus is not None and gpus != 1:
        raise SystemExit(
            f"error: --gpus {gpus}: one process trains on one GPU; train on {gpus} GPUs with "
            f"tools/dist_train.sh CONFIG {gpus}"
        )
    if gpu_ids is not None:
        ids = " ".join(map(str, gpu_ids))
        if len(gpu_ids) > 1 or not torch.cuda.is_available():
            raise SystemExit(
                f"error: --gpu-ids {ids}: one process trains on one GPU; choose GPUs with "
                f"CUDA_VISIBLE_DEVICES={ids.replace(' ', ',')} tools/dist_train.sh CONFIG {len(gpu_ids)}"
            )
        torch.cuda.set_device(gpu_ids[0])


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
    if getattr(args, "amp", False):
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if getattr(args, "seed", None) is not None:
        cfg.randomness = dict(cfg.get("randomness") or {}, seed=args.seed)
    if getattr(args, "deterministic", False):
        cfg.randomness = dict(cfg.get("randomness") or {}, deterministic=True)
    if getattr(args, "no_validate", False):
        # mmengine runs no validation loop when these three are None.
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    _check_gpus(args)
    load_from = getattr(args, "load_from", None)
    resume = getattr(args, "resume", None)
    if load_from and resume:
        raise SystemExit("error: --load-from and --resume: give one (--resume also restores the schedule)")
    if load_from:
        check_checkpoint(load_from)
        cfg.load_from = load_from
    if resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif resume:
        check_checkpoint(resume)
        cfg.resume, cfg.load_from = True, resume
    setup_distributed(cfg)
    try:
        Runner.from_cfg(cfg).train()
    finally:
        finish_distributed()


def _evaluators(cfg: Config) -> list:
    if isinstance(cfg.test_evaluator, dict):
        cfg.test_evaluator = [cfg.test_evaluator]
    cfg.test_evaluator = list(cfg.test_evaluator)
    return cfg.test_evaluator


def set_evaluator_options(cfg: Config, options: dict, metrics_registry, renames: dict | None = None) -> None:
    """The original's --eval-options onto the test evaluator's arguments. ``renames`` maps the original's
    names onto mmdet's / mmseg's (e.g. ``jsonfile_prefix`` -> ``outfile_prefix``); an argument the
    evaluator does not take is refused, naming those it does."""
    renames = renames or {}
    evaluator = _evaluators(cfg)[0]
    metric = metrics_registry.get(evaluator["type"])
    known = [
        n
        for n, p in inspect.signature(metric.__init__).parameters.items()
        if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    for key, value in options.items():
        name = renames.get(key, key)
        if name not in known:
            raise SystemExit(
                f"error: --eval-options {key}: {evaluator['type']} takes {', '.join(known + sorted(renames))}"
            )
        evaluator[name] = value


def test(cfg: Config, args: argparse.Namespace) -> dict:
    allow_mmengine_checkpoints()
    write_checkpoints_atomically()
    checkpoint = check_checkpoint(args.checkpoint)
    cfg.load_from = args.checkpoint
    if args.out:
        if not args.out.endswith((".pkl", ".pickle")):
            raise SystemExit(f"error: --out {args.out}: the predictions are written as a pickle (.pkl or .pickle)")
        _evaluators(cfg).append(dict(type="DumpResults", out_file_path=args.out))
    if getattr(args, "gpu_collect", False) and getattr(args, "tmpdir", None):
        raise SystemExit("error: --gpu-collect and --tmpdir: --tmpdir is where results are gathered without it")
    if getattr(args, "gpu_collect", False) or getattr(args, "tmpdir", None):
        device = "gpu" if args.gpu_collect else "cpu"
        hook = dict(type="CollectResultsHook", device=device, tmpdir=args.tmpdir)
        cfg.custom_hooks = [*(cfg.get("custom_hooks") or []), hook]
    if getattr(args, "show", False) or getattr(args, "show_dir", None):
        # mmdet's and mmseg's visualisation hooks join test_out_dir to <work_dir>/<timestamp>; an absolute
        # folder keeps the original's meaning, the folder given.
        hook = cfg.default_hooks.visualization
        hook.draw = True
        if args.show:
            hook.show = True
        if args.show_dir:
            hook.test_out_dir = str(Path(args.show_dir).resolve())
    setup_distributed(cfg)
    try:
        runner = Runner.from_cfg(cfg)
        check_fits(runner.model, checkpoint, args.checkpoint, args.config)
        del checkpoint
        return runner.test()
    finally:
        finish_distributed()
