"""The README's three training commands (ELSA-Swin-T, -S, -B) hold the original's recipe, value by value.

The original is damo-cv/ELSA at f3b7ac7 on timm 0.4.9 (its cls/requirements.txt). Every expected value
cites the file and line of the original (``train.py`` is its cls/train.py, ``elsa_swin.py`` its
cls/models/elsa_swin.py) or of timm 0.4.9 that sets it. The recipe is read back from what cls/train.py
builds (its parser, model, optimizer, scheduler, EMA, mixup, loss and loaders), not from its source.
"""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from cls_helpers import write_digits
from timm.data import FastCollateMixup, resolve_data_config
from timm.data.loader import PrefetchLoader
from timm.data.transforms import str_to_interp_mode
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV2

from elsa_cls import train, validate
from elsa_op import ELSAAttention

README = Path(__file__).resolve().parents[1] / "README.md"
IMAGENET_STEPS = 1251  # ceil(1,281,167 images / (8 GPUs x 128)): the steps of one epoch; the LR is per epoch

# (argument, expected value, where the original sets it) for all three commands.
COMMON = [
    ("epochs", 300, "README command; train.py:141"),
    ("cooldown_epochs", 10, "train.py:149 (default; the command does not set it)"),
    ("sched", "cosine", "README command; train.py:123"),
    ("lr", 1e-3, "README command (train.py:125 defaults to 1.6e-3); no batch scaling in train.py"),
    ("warmup_epochs", 20, "README command; train.py:147"),
    ("warmup_lr", 1e-6, "README command; train.py:137"),
    ("min_lr", 1e-5, "README command; train.py:139"),
    ("decay_rate", 0.1, "train.py:153"),
    ("lr_cycle_mul", 1.0, "train.py:133"),
    ("lr_cycle_limit", 1, "train.py:135"),
    ("lr_noise", None, "train.py:127"),
    ("opt", "adamw", "README command; train.py:107"),
    ("weight_decay", 0.05, "README command; train.py:115"),
    ("opt_betas", None, "train.py:111 (AdamW's own (0.9, 0.999))"),
    ("opt_eps", None, "train.py:109 (AdamW's own 1e-8)"),
    ("clip_grad", 5.0, "README command; train.py:117"),
    ("clip_mode", "norm", "train.py:119"),
    ("batch_size", 128, "README command; train.py:101"),
    ("validation_batch_size_multiplier", 1, "train.py:103, 585"),
    ("workers", 8, "README command; train.py:241"),
    ("aa", "rand-m9-mstd0.5-inc1", "README command; train.py:169"),
    ("train_interpolation", "random", "train.py:199"),
    ("scale", [0.08, 1.0], "train.py:159"),
    ("ratio", [3.0 / 4.0, 4.0 / 3.0], "train.py:161"),
    ("hflip", 0.5, "train.py:163"),
    ("vflip", 0.0, "train.py:165"),
    ("color_jitter", 0.4, "train.py:167 (unused with --aa, timm 0.4.9 transforms_factory.py)"),
    ("reprob", 0.25, "README command; train.py:175"),
    ("remode", "pixel", "README command; train.py:177"),
    ("recount", 1, "train.py:179"),
    ("mixup", 0.8, "README command; train.py:183"),
    ("cutmix", 1.0, "README command; train.py:185"),
    ("cutmix_minmax", None, "train.py:187"),
    ("mixup_prob", 1.0, "train.py:189"),
    ("mixup_switch_prob", 0.5, "train.py:191"),
    ("mixup_mode", "batch", "train.py:193"),
    ("mixup_off_epoch", 0, "train.py:195"),
    ("smoothing", 0.1, "train.py:197"),
    ("drop", 0.0, "train.py:201"),
    ("model_ema_decay", 0.99992, "train.py:229"),
    ("model_ema_force_cpu", False, "train.py:227"),
    ("no_prefetcher", False, "train.py:255, 309: the prefetcher is on"),
    ("amp", True, "README command; train.py:245, 332-336 (native AMP first)"),
    ("eval_metric", "top1", "train.py:259"),
    ("seed", 42, "train.py:233"),
]
PER_MODEL = {  # README: "ELSA-Swin-S: `--drop-path 0.3`; ELSA-Swin-B: `--drop-path 0.5 --model-ema`"
    "elsa_swin_tiny": [("drop_path", 0.1, "README command"), ("model_ema", False, "README command")],
    "elsa_swin_small": [("drop_path", 0.3, "README, Train"), ("model_ema", False, "README, Train")],
    "elsa_swin_base": [("drop_path", 0.5, "README, Train"), ("model_ema", True, "README, Train")],
}


def readme_commands() -> dict[str, list[str]]:
    """The three commands: the README's ELSA-Swin-T command and its -S and -B variants."""
    text = README.read_text()
    found = re.search(r"bash \./distributed_train\.sh 8 <PATH_TO_IMAGENET> (.*?)\n```", text, re.S)
    assert found, "README's training command"
    tiny = found.group(1).replace("\\\n", " ").split()
    assert "(ELSA-Swin-S: `--drop-path 0.3`; ELSA-Swin-B: `--drop-path 0.5 --model-ema`)" in text

    def variant(model, drop_path, extra=()):
        args = list(tiny)
        args[args.index("--model") + 1] = model
        args[args.index("--drop-path") + 1] = drop_path
        return args + list(extra)

    return {
        "elsa_swin_tiny": tiny,
        "elsa_swin_small": variant("elsa_swin_small", "0.3"),
        "elsa_swin_base": variant("elsa_swin_base", "0.5", ["--model-ema"]),
    }


COMMANDS = readme_commands()


def parsed(model: str, *extra: str):
    args = train.parse_args(["<PATH_TO_IMAGENET>", *COMMANDS[model], *extra])
    args.distributed, args.rank, args.world_size = False, 0, 1
    return args


def original_lr(epoch: int) -> float:
    """timm 0.4.9's CosineLRScheduler as the original's create_scheduler builds it (scheduler_factory.py:25-41:
    t_initial=epochs, warmup_t, warmup_lr_init, lr_min, cycle_limit 1, t_in_epochs; the run lasts
    get_cycle_length() + cooldown_epochs), stepped per epoch (train.py:489-490, 699-701); cosine_lr.py:62-95:"""
    t_initial, warmup_t, warmup_lr, base, lr_min = 300, 20, 1e-6, 1e-3, 1e-5
    if epoch < warmup_t:  # cosine_lr.py:69-70, warmup_steps of line 63
        return warmup_lr + epoch * (base - warmup_lr) / warmup_t
    i = epoch // t_initial  # cosine_lr.py:80-82 (t_mul 1); warmup_prefix False: t counts from 0
    if i < 1:  # cosine_lr.py:88-91 (cycle_limit 1), gamma = decay_rate ** 0
        return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * (epoch - t_initial * i) / t_initial))
    return lr_min  # cosine_lr.py:92-93: the cool-down


@pytest.mark.parametrize("model", list(COMMANDS))
def test_readme_command_arguments(model):
    args = parsed(model)
    assert args.model == model
    for name, want, where in COMMON + PER_MODEL[model]:
        assert getattr(args, name) == want, f"{name}: {getattr(args, name)!r}, the original's is {want!r} ({where})"


@pytest.mark.parametrize("model", list(COMMANDS))
def test_lr_at_every_epoch_and_weight_decay_groups(model):
    args = parsed(model)
    with torch.device("meta"):
        net = train.build_model(args, 1000)
    optimizer = train.build_optimizer(net, args)
    scheduler, num_epochs = train.build_scheduler(optimizer, args, IMAGENET_STEPS)
    assert num_epochs == 310, "300 epochs + a 10-epoch cool-down: scheduler_factory.py:41, train.py:149"
    got = [optimizer.param_groups[0]["lr"]]
    for epoch in range(1, num_epochs):
        scheduler.step(epoch)
        assert len({g["lr"] for g in optimizer.param_groups}) == 1
        got.append(optimizer.param_groups[0]["lr"])
    for epoch, lr in enumerate(got):
        assert lr == pytest.approx(original_lr(epoch), rel=1e-12, abs=0), f"epoch {epoch}"
    assert got[0] == 1e-6 and got[20] < 1e-3 and got[-10:] == [1e-5] * 10

    # timm 0.4.9's optim_factory.py:101-106 with add_weight_decay (lines 29-41): no decay for 1-D
    # parameters, biases and the exact names of no_weight_decay(), which in elsa_swin.py:488-489 is only
    # absolute_pos_embed (absent). So relative-position tables and ghost kernels decay.
    names = {id(p): n for n, p in net.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert sorted(groups) == [0.0, 0.05]
    want_no_decay = {n for n, p in net.named_parameters() if p.ndim == 1 or n.endswith(".bias")}
    assert groups[0.0] == want_no_decay
    assert groups[0.05] == set(names.values()) - want_no_decay
    decayed = groups[0.05]
    for kind in (
        "relative_position_bias_table",
        "ghost_add",
        "attn.attn.0.weight",
        "pre_proj.weight",
        "head.fc.weight",
    ):
        assert any(n.endswith(kind) for n in decayed), f"{kind} must decay (optim_factory.py:35)"
    assert isinstance(optimizer, torch.optim.AdamW)  # train.py:107, optim_factory.py (adamw)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8


@pytest.mark.parametrize("model", list(COMMANDS))
def test_drop_rates_ema_loss_and_mixup(model):
    args = parsed(model)
    with torch.device("meta"):
        net = train.build_model(args, 1000)
    # --drop 0 (train.py:201): no dropout anywhere; drop path rising linearly to --drop-path in the last
    # block (elsa_swin.py:448, 464).
    assert all(m.p == 0 for m in net.modules() if isinstance(m, nn.Dropout))
    rates = [m.drop_prob for m in net.modules() if isinstance(m, DropPath)]
    assert rates and rates[-1] == pytest.approx(args.drop_path) and rates == sorted(rates)

    # EMA: ModelEmaV2 with a fixed decay from the first update (train.py:459-462, 816-817;
    # timm 0.4.9 model_ema.py:105-123)
    ema = train.build_ema(nn.Linear(2, 2), args)
    assert type(ema) is ModelEmaV2 and ema.decay == 0.99992
    layer = nn.Linear(2, 2)
    start = ema.module.weight.detach().clone()
    ema.update(layer)
    torch.testing.assert_close(ema.module.weight, 0.99992 * start + 0.00008 * layer.weight.detach())

    # Mixup on uint8 batches in the collate (train.py:516-537, prefetcher on) with smoothed targets
    # (train.py:524); the loss on them is soft-target cross-entropy (train.py:618).
    collate, mixup_fn = train.build_mixup(args, 1000, prefetcher=True)
    assert isinstance(collate, FastCollateMixup) and mixup_fn is None
    assert (collate.mixup_alpha, collate.cutmix_alpha, collate.cutmix_minmax) == (0.8, 1.0, None)
    assert (collate.mix_prob, collate.switch_prob, collate.mode) == (1.0, 0.5, "batch")
    assert (collate.label_smoothing, collate.num_classes) == (0.1, 1000)
    assert isinstance(train.build_loss(args, mixup=True), SoftTargetCrossEntropy)


def test_drop_acts_as_in_the_original():
    """--drop (train.py:353): after the patch embedding (elsa_swin.py:445, 506), in the window attention's
    projection and every MLP (elsa_swin.py:229, 234; elsa/elsa.py:270-273), not after ELSA's attention
    (elsa/elsa.py:260-263 passes no proj_drop) nor before the head (elsa_swin.py:481)."""
    args = parsed("elsa_swin_tiny", "--drop", "0.2")
    with torch.device("meta"):
        net = train.build_model(args, 1000)
    assert net.pos_drop.p == 0.2 and net.head.drop.p == 0.0
    assert all(m.proj_drop.p == 0.0 for m in net.modules() if isinstance(m, ELSAAttention))
    stage4 = net.layers[3].blocks[0]
    assert stage4.attn.proj_drop.p == 0.2 and stage4.mlp.drop1.p == 0.2 and stage4.mlp.drop2.p == 0.2
    assert net.layers[0].blocks[0].mlp.drop2.p == 0.2


def test_augmentation_order_and_eval_preprocessing(tmp_path):
    """Training: random-resized crop (random interpolation), flip and RandAugment in the workers, uint8
    batches (timm 0.4.9 transforms_factory.py:110-112) mixed in the collate, then normalised and randomly
    erased on the device (train.py:554-580 with the prefetcher; timm 0.4.9 loader.py:54-102). Evaluation:
    bicubic resize to floor(224 / 0.9), centre crop 224, ImageNet mean and std (train.py:582-595;
    elsa_swin.py:27-35; timm 0.4.9 transforms_factory.py:147)."""
    data = write_digits(tmp_path / "d", per_class=2, val_per_class=1)
    args = parsed("elsa_swin_tiny", "-b", "4", "-j", "0", "--num-classes", "4")
    train_set, eval_set = train.build_datasets(type(args)(**dict(vars(args), data_dir=str(data))))
    with torch.device("meta"):
        net = train.build_model(args, 4)
    config = resolve_data_config(vars(args), model=net)
    assert config["input_size"] == (3, 224, 224) and config["interpolation"] == "bicubic"
    assert config["crop_pct"] == 0.9
    assert config["mean"] == (0.485, 0.456, 0.406) and config["std"] == (0.229, 0.224, 0.225)
    collate, _ = train.build_mixup(args, 4, prefetcher=True)
    loader, loader_eval = train.build_loaders(args, train_set, eval_set, config, torch.device("cpu"), collate)
    assert isinstance(loader, PrefetchLoader) and loader.loader.collate_fn is collate
    erasing = loader.random_erasing
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)
    steps = [type(t).__name__ for t in train_set.transform.transforms]
    assert steps[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in str(train_set.transform)
    bilinear_or_bicubic = (str_to_interp_mode("bilinear"), str_to_interp_mode("bicubic"))
    assert tuple(train_set.transform.transforms[0].interpolation) == bilinear_or_bicubic  # timm 0.4.9 transforms.py:55
    assert train_set.transform.transforms[0].scale == (0.08, 1.0)
    assert "Normalize" not in steps and "RandomErasing" not in steps  # both after mixup, on the device
    rand_augment = train_set.transform.transforms[2]
    assert "PosterizeIncreasing" in {op.name for op in rand_augment.ops}  # inc1
    assert {(op.magnitude, op.magnitude_std) for op in rand_augment.ops} == {(9, 0.5)}  # m9, mstd0.5
    x, target = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 224, 224) and target.shape == (4, 4)
    assert torch.allclose(target.sum(1), torch.ones(4)) and target.max() < 1  # mixed and smoothed

    assert isinstance(loader_eval, PrefetchLoader) and loader_eval.random_erasing is None
    steps = [type(t).__name__ for t in eval_set.transform.transforms]
    assert steps[:2] == ["Resize", "CenterCrop"]
    resize = eval_set.transform.transforms[0]
    assert resize.size == 248 and str(resize.interpolation) == "InterpolationMode.BICUBIC"
    assert loader_eval.loader.batch_size == 4  # -vb 1 x -b (train.py:585)
    assert validate.build_parser().parse_args(["d"]).batch_size == 256  # validate.py:53


# ---- every flag of the original's train.py (lines 59-286) and validate.py (lines 43-109) ------------
# (flag and a value the original takes) -> accepted; the refused ones stop with a one-line reason.
ORIGINAL_TRAIN_FLAGS = [
    ["--dataset", ""],
    ["-d", "folder"],
    ["--train-split", "train"],
    ["--val-split", "validation"],
    ["--model", "elsa_swin_tiny"],
    ["--initial-checkpoint", ""],
    ["--resume", ""],
    ["--no-resume-opt"],
    ["--num-classes", "1000"],
    ["--gp", "avg"],
    ["--img-size", "224"],
    ["--input-size", "3", "224", "224"],
    ["--crop-pct", "0.9"],
    ["--mean", "0.485", "0.456", "0.406"],
    ["--std", "0.229", "0.224", "0.225"],
    ["--interpolation", "bicubic"],
    ["-b", "64"],
    ["-vb", "2"],
    ["--validation-batch-size-multiplier", "2"],
    ["--opt", "adamw"],
    ["--opt-eps", "1e-8"],
    ["--opt-betas", "0.9", "0.999"],
    ["--momentum", "0.9"],
    ["--weight-decay", "0.05"],
    ["--clip-grad", "5"],
    ["--clip-mode", "norm"],
    ["--sched", "cosine"],
    ["--lr", "1e-3"],
    ["--lr-noise", "0.5", "0.9"],
    ["--lr-noise-pct", "0.5"],
    ["--lr-noise-std", "0.5"],
    ["--lr-cycle-mul", "1"],
    ["--lr-cycle-limit", "1"],
    ["--warmup-lr", "1e-6"],
    ["--min-lr", "1e-5"],
    ["--epochs", "300"],
    ["--start-epoch", "0"],
    ["--decay-epochs", "30"],
    ["--warmup-epochs", "20"],
    ["--cooldown-epochs", "10"],
    ["--patience-epochs", "10"],
    ["--decay-rate", "0.1"],
    ["--dr", "0.1"],
    ["--no-aug"],
    ["--scale", "0.08", "1"],
    ["--ratio", "0.75", "1.33"],
    ["--hflip", "0.5"],
    ["--vflip", "0"],
    ["--color-jitter", "0.4"],
    ["--aa", "rand-m9-mstd0.5-inc1"],
    ["--reprob", "0.25"],
    ["--remode", "pixel"],
    ["--recount", "1"],
    ["--mixup", "0.8"],
    ["--cutmix", "1"],
    ["--cutmix-minmax", "0.2", "0.8"],
    ["--mixup-prob", "1"],
    ["--mixup-switch-prob", "0.5"],
    ["--mixup-mode", "batch"],
    ["--mixup-off-epoch", "0"],
    ["--smoothing", "0.1"],
    ["--train-interpolation", "random"],
    ["--drop", "0.1"],
    ["--drop-connect", "0.1"],
    ["--drop-path", "0.1"],
    ["--drop-block", "0.1"],
    ["--bn-momentum", "0.1"],
    ["--bn-eps", "1e-5"],
    ["--sync-bn"],
    ["--dist-bn", "reduce"],
    ["--model-ema"],
    ["--model-ema-force-cpu"],
    ["--model-ema-decay", "0.99992"],
    ["--seed", "42"],
    ["--log-interval", "50"],
    ["--recovery-interval", "100"],
    ["--checkpoint-hist", "10"],
    ["-j", "8"],
    ["--save-images"],
    ["--amp"],
    ["--apex-amp"],
    ["--native-amp"],
    ["--channels-last"],
    ["--pin-mem"],
    ["--no-prefetcher"],
    ["--output", "out"],
    ["--eval-metric", "top1"],
    ["--local_rank", "0"],
    ["--use-multi-epochs-loader"],
    ["--finetune", "x.pth"],
]
REFUSED_TRAIN_FLAGS = [
    ["--pretrained"],
    ["--aug-splits", "3"],
    ["--jsd"],
    ["--resplit"],
    ["--split-bn"],
    ["--bn-tf"],
    ["--tta", "2"],
    ["--torchscript"],
    ["--token-label"],
    ["--token-label-data", "labels/"],
    ["--token-label-size", "14"],
    ["--dense-weight", "1.0"],
    ["--cls-weight", "0.5"],
    ["--ground-truth"],
    ["--dataset", "tfds/imagenet2012"],
]
ORIGINAL_VALIDATE_FLAGS = [
    ["--dataset", ""],
    ["--split", "validation"],
    ["-m", "elsa_swin_tiny"],
    ["-j", "4"],
    ["-b", "256"],
    ["--img-size", "224"],
    ["--input-size", "3", "224", "224"],
    ["--crop-pct", "0.9"],
    ["--mean", "0.485", "0.456", "0.406"],
    ["--std", "0.229", "0.224", "0.225"],
    ["--interpolation", "bicubic"],
    ["--num-classes", "1000"],
    ["--gp", "avg"],
    ["--log-freq", "50"],
    ["--checkpoint", "x.pth"],
    ["--num-gpu", "1"],
    ["--no-test-pool"],
    ["--no-prefetcher"],
    ["--pin-mem"],
    ["--channels-last"],
    ["--amp"],
    ["--apex-amp"],
    ["--native-amp"],
    ["--use-ema"],
    ["--torchscript"],
    ["--results-file", "r.csv"],
    ["--real-labels", "real.json"],
    ["--valid-labels", "valid.txt"],
]
REFUSED_VALIDATE_FLAGS = [
    ["--pretrained"],
    ["--class-map", "map.txt"],
    ["--tf-preprocessing"],
    ["--legacy-jit"],
    ["--num-gpu", "2"],
    ["--gp", "max"],
]


def test_every_original_flag_is_accepted_or_refused_with_a_reason():
    for flag in ORIGINAL_TRAIN_FLAGS:
        train.parse_args(["data", *flag])
    for flag in ORIGINAL_VALIDATE_FLAGS:
        validate.parse_args(["data", *flag])
    for tool, flags in ((train, REFUSED_TRAIN_FLAGS), (validate, REFUSED_VALIDATE_FLAGS)):
        for flag in flags:
            with pytest.raises(SystemExit) as stop:
                tool.parse_args(["data", *flag])
            message = stop.value.code
            assert isinstance(message, str) and "\n" not in message and "is not supported: " in message, flag
    # their meanings
    args = train.parse_args(["data", "--finetune", "w.pth", "--drop-connect", "0.2", "-vb", "2"])
    assert (args.initial_checkpoint, args.drop_path, args.validation_batch_size_multiplier) == ("w.pth", 0.2, 2)
    args = train.parse_args(["data", "--lr-noise", "0.5", "--lr-noise-pct", "0.3", "--lr-noise-std", "0.7"])
    args.distributed = False
    scheduler, _ = train.build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1), args, 10)
    assert (scheduler.noise_range_t, scheduler.noise_pct, scheduler.noise_std) == (150, 0.3, 0.7)
    assert validate.parse_args(["data", "--log-freq", "7"]).log_interval == 7
    with pytest.raises(SystemExit, match="elsa_swin_tiny does not take one of the options"):
        train.build_model(train.parse_args(["data", "--drop-block", "0.1"]), 10)
