"""seg: the ELSA-Swin backbone in mmsegmentation, the UPerNet configs, and train -> test (+TTA) -> resume."""

import json
from pathlib import Path

import pytest
import torch

mmseg = pytest.importorskip("mmseg")

from mm_data import SEG_CLASSES, write_ade  # noqa: E402
from mm_helpers import (  # noqa: E402
    REPO,
    build_model,
    capture_runs,
    fake_slurm,
    falling,
    load_tool,
    logged_metrics,
    losses,
    num_params,
    published_mparams,
    run_script,
    run_tool,
    run_upstream,
    scalars,
    tool_error,
)

pytestmark = pytest.mark.mm

CONFIGS = sorted((REPO / "seg" / "configs" / "elsa_swin").glob("*.py"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(config):
    cfg, model = build_model(config)
    assert cfg.model.backbone.type == "ELSASwin"
    assert cfg.optim_wrapper.optimizer.lr == 6e-5 and cfg.optim_wrapper.optimizer.weight_decay == 0.01
    assert cfg.train_cfg.max_iters == 160000 and cfg.param_scheduler[0].end == 1501
    assert cfg.train_dataloader.batch_size == 2 and cfg.model.auxiliary_head.in_index == 2
    assert cfg.model.decode_head.num_classes == 150
    # the published models' sizes (README): UPerNet T/S 61M/85M (B: 126M, not published)
    assert round(num_params(model) / 1e6) == published_mparams(config)


SMALL_TTA = """
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale_factor=r, keep_ratio=True) for r in (0.5, 1.0, 1.5)],
        [dict(type='RandomFlip', prob=0., direction='horizontal'),
         dict(type='RandomFlip', prob=1., direction='horizontal')],
        [dict(type='LoadAnnotations', reduce_zero_label=True)],
        [dict(type='PackSegInputs')],
    ]),
]
"""

SMALL = """
_base_ = '{config}'
data_root = '{data}/'
metainfo = dict(classes={classes}, palette=[[255, 0, 0], [0, 255, 0], [0, 0, 0]])
crop_size = (64, 64)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(drop_path_rate=0.0),
    decode_head=dict(num_classes=3, channels=64, norm_cfg=dict(type='BN', requires_grad=True)),
    auxiliary_head=dict(num_classes=3, channels=32, norm_cfg=dict(type='BN', requires_grad=True)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(96, 80), ratio_range=(0.8, 1.2), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.9),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(96, 80), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
{tta}train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(
    data_root=data_root, metainfo=metainfo, pipeline=train_pipeline,
    data_prefix=dict(img_path='images/training', seg_map_path='annotations/training')))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(
    data_root=data_root, metainfo=metainfo, pipeline=test_pipeline,
    data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation')))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=3e-4))
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters={iters}, val_interval=1000)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval={ckpt}))
"""


def small_config(tmp_path: Path, iters: int = 12, ckpt: int = 6, small_tta: bool = True) -> Path:
    """The tiny UPerNet on small generated ADE20K data; small_tta replaces the config's test-time
    augmentation (resize to fit 2048 r x 512 r) with rescaling by r, a tenth of the work on 96x80 images."""
    data = write_ade(tmp_path / "ade")
    path = tmp_path / "small_upernet.py"
    path.write_text(
        SMALL.format(
            config=REPO / "seg" / "configs" / "elsa_swin" / "upernet_elsa-swin-t_8xb2-160k_ade20k-512x512.py",
            data=data,
            classes=SEG_CLASSES,
            iters=iters,
            ckpt=ckpt,
            tta=SMALL_TTA if small_tta else "",
        )
    )
    return path


@pytest.mark.slow
def test_train_then_test_with_and_without_tta_then_resume(tmp_path):
    config = small_config(tmp_path)
    work = tmp_path / "work"
    r = run_tool("seg", ["tools/train.py", str(config), "--work-dir", str(work)])
    assert r.returncode == 0, r.stderr[-4000:]
    values = losses(work)
    assert len(values) == 12 and falling(values), values
    ckpt = work / "iter_12.pth"
    for extra in ([], ["--aug-test"]):
        r = run_tool(
            "seg", ["tools/test.py", str(config), str(ckpt), *extra, "--eval", "mIoU", "--work-dir", str(work)]
        )
        assert r.returncode == 0, r.stderr[-4000:]
        assert "mIoU" in r.stdout + r.stderr
    r = run_tool(
        "seg",
        ["tools/train.py", str(config), "--work-dir", str(tmp_path / "resumed"), "--resume", str(work / "iter_6.pth")],
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(losses(tmp_path / "resumed")) == 6  # iterations 7-12 only


@pytest.mark.slow
def test_mmseg_own_tools_train_and_test_our_config(tmp_path):
    """Once the project is installed, mmseg's installed tools/train.py and tools/test.py take our configs."""
    config = small_config(tmp_path, iters=4, ckpt=4, small_tta=False)
    work = tmp_path / "work"
    r = run_upstream("mmseg", "train.py", [str(config), "--work-dir", str(work)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(losses(work)) == 4
    r = run_upstream("mmseg", "test.py", [str(config), str(work / "iter_4.pth"), "--work-dir", str(work)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "mIoU" in r.stdout + r.stderr
    # --tta with the config's own multi-scale + flip pipeline (the original's scales), on one image
    r = run_upstream(
        "mmseg",
        "test.py",
        [
            str(config),
            str(work / "iter_4.pth"),
            "--tta",
            "--work-dir",
            str(work),
            "--cfg-options",
            "test_dataloader.dataset.indices=1",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "mIoU" in r.stdout + r.stderr


def test_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = small_config(tmp_path)
    message = tool_error("seg", "test", [config, tmp_path / "x.pth", "--eval", "mIoU"])
    assert "x.pth does not exist" in message
    torch.save({}, tmp_path / "x.pth")
    message = tool_error("seg", "test", [config, tmp_path / "x.pth", "--eval", "mAP"])
    assert "--eval mAP" in message
    message = tool_error("seg", "test", [config, tmp_path / "x.pth", "--eval", "mIoU", "--work-dir", tmp_path / "w"])
    assert "x.pth does not fit the model of" in message
    message = tool_error(
        "seg", "train", [config, "--work-dir", tmp_path / "w", "--cfg-options", "train_cfg.max_iters=-1"]
    )
    assert message.startswith("error: train_cfg.max_iters=-1")
    no_tta = tmp_path / "no_tta.py"
    no_tta.write_text(f"_base_ = '{config}'\ntta_pipeline = None\n")
    message = tool_error("seg", "test", [no_tta, tmp_path / "x.pth", "--aug-test"])
    assert message == f"error: --aug-test: {no_tta} has no tta_pipeline and tta_model"


def test_train_auto_scale_lr(tmp_path, monkeypatch):
    """--auto-scale-lr: the config's learning rate (3e-4 in the small config) was set for 16 images per step
    (8 GPUs x 2); one process with 2 images trains at 2/16 of it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = small_config(tmp_path, iters=3, ckpt=3)
    work = tmp_path / "work"
    # mmengine keeps one visualizer per name in the process: a name of this run's own sends its scalars here
    unique = ["--cfg-options", f"visualizer.name=auto_scale_lr_{tmp_path.name}"]
    load_tool("seg", "train").main([str(config), "--work-dir", str(work), "--auto-scale-lr", *unique])
    assert scalars(work, "lr")[-1] == pytest.approx(3e-4 * 2 / 16)


UPERNET_T = REPO / "seg" / "configs" / "elsa_swin" / "upernet_elsa-swin-t_8xb2-160k_ade20k-512x512.py"


def test_original_flags(tmp_path, monkeypatch):
    """The original's seg tools/train.py --load-from and tools/test.py flags, each on the config the Runner
    gets (the flags the det tools share are tested there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    seen = capture_runs(monkeypatch)
    ckpt = tmp_path / "segmentor.pth"
    torch.save({"state_dict": {}}, ckpt)
    load_tool("seg", "train").main([str(UPERNET_T), "--load-from", str(ckpt), "--no-validate", "--seed", "3"])
    cfg = seen[-1]
    assert cfg.load_from == str(ckpt) and cfg.val_cfg is None and cfg.randomness.seed == 3
    test = load_tool("seg", "test")
    # seg's --options is the original's config options; imgfile_prefix is mmseg's output_dir
    test.main(
        [str(UPERNET_T), str(ckpt), "--options", "test_dataloader.num_workers=1", "--format-only"]
        + ["--eval-options", "imgfile_prefix=labels", "efficient_test=True", "--show-dir", "pictures"]
    )
    cfg = seen[-1]
    (evaluator,) = cfg.test_evaluator
    assert evaluator.type == "IoUMetric" and evaluator.format_only is True and evaluator.output_dir == "labels"
    assert cfg.test_dataloader.num_workers == 1
    hook = cfg.default_hooks.visualization
    assert hook.type == "SegVisualizationHook" and hook.draw is True and hook.test_out_dir == str(tmp_path / "pictures")
    test.main([str(UPERNET_T), str(ckpt), "--format-only", "--work-dir", "w"])
    assert seen[-1].test_evaluator[0].output_dir == "w/format_results"
    message = tool_error("seg", "test", [UPERNET_T, ckpt, "--eval-options", "nan_to_num=0", "beta=2", "pre=x"])
    assert message.startswith("error: --eval-options pre: IoUMetric takes ignore_index, iou_metrics"), message
    message = tool_error("seg", "test", [UPERNET_T, ckpt, "--eval", "mIoU", "--format-only"])
    assert message.startswith("error: --eval and --format-only"), message


TWO_VIEWS = """
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale=(96, 80), keep_ratio=True), dict(type='Resize', scale=(96, 80), keep_ratio=True)],
        [dict(type='LoadAnnotations', reduce_zero_label=True)],
        [dict(type='PackSegInputs')],
    ]),
]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
"""


@pytest.mark.slow
def test_distributed_train_and_test_on_cpu(tmp_path):
    """tools/dist_train.sh, then tools/dist_test.sh and tools/slurm_test.sh (srun and scontrol stood in for),
    2 processes each on CPUs; the 2-process tests score as the 1-process one. The UPerNet heads' SyncBN runs
    as BN."""
    config = small_config(tmp_path, iters=2, ckpt=2)
    sync = ["--cfg-options", "model.decode_head.norm_cfg.type=SyncBN", "model.auxiliary_head.norm_cfg.type=SyncBN"]
    work = tmp_path / "work"
    r = run_script("seg", "dist_train.sh", [config, 2, "--work-dir", work, *sync])
    assert r.returncode == 0, r.stderr[-4000:]
    assert "the model's 2 SyncBN norm configs build BN" in r.stdout + r.stderr
    assert len(losses(work)) == 2
    ckpt = work / "iter_2.pth"
    r = run_script("seg", "dist_test.sh", [config, ckpt, 2, "--work-dir", tmp_path / "dist", *sync])
    assert r.returncode == 0, r.stderr[-4000:]
    env = dict(fake_slurm(tmp_path), GPUS="2", GPUS_PER_NODE="2")
    r = run_script("seg", "slurm_test.sh", ["cpus", "test", config, ckpt, "--work-dir", tmp_path / "slurm"], env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    srun_args = json.loads((tmp_path / "srun_args.json").read_text())
    assert srun_args[:8] == ["-p", "cpus", "--job-name=test", "--gres=gpu:2", "--ntasks=2"] + [
        "--ntasks-per-node=2",
        "--cpus-per-task=5",
        "--kill-on-bad-exit=1",
    ]
    assert srun_args[9:] == ["-u", str(REPO / "seg" / "tools" / "test.py"), str(config), str(ckpt)] + [
        "--work-dir",
        str(tmp_path / "slurm"),
        "--launcher",
        "slurm",
    ]
    single = load_tool("seg", "test").main([str(config), str(ckpt), "--work-dir", str(tmp_path / "single"), *sync])
    assert "mIoU" in single
    for work_dir in (tmp_path / "dist", tmp_path / "slurm"):
        assert {k: v for k, v in logged_metrics(work_dir).items() if k in single} == single
    # The configs' multi-scale test (several views of each image through MultiViewTestLoop): with two views
    # that are the single-scale one, the averaged probabilities give the single-scale labels.
    views = tmp_path / "two_views.py"
    views.write_text(f"_base_ = '{config}'\n" + TWO_VIEWS)
    merged = load_tool("seg", "test").main([str(views), str(ckpt), "--work-dir", str(tmp_path / "views")])
    assert merged == single
