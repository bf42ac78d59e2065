"""seg: the ELSA-Swin backbone in mmsegmentation, the UPerNet configs, and train -> test (+TTA) -> resume."""

from pathlib import Path

import pytest
import torch

mmseg = pytest.importorskip("mmseg")

from mm_data import SEG_CLASSES, write_ade  # noqa: E402
from mm_helpers import REPO, falling, losses, run_tool, run_upstream  # noqa: E402

CONFIGS = sorted((REPO / "seg" / "configs" / "elsa_swin").glob("*.py"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(config):
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(str(config))
    assert cfg.model.backbone.type == "ELSASwin"
    assert cfg.optim_wrapper.optimizer.lr == 6e-5 and cfg.optim_wrapper.optimizer.weight_decay == 0.01
    assert cfg.train_cfg.max_iters == 160000 and cfg.param_scheduler[0].end == 1500
    assert cfg.train_dataloader.batch_size == 2 and cfg.model.auxiliary_head.in_index == 2
    assert cfg.model.decode_head.num_classes == 150
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
    # the published models' sizes (README): UPerNet T/S 61M/85M (B: 126M, not published)
    expected = {"t": 61, "s": 85, "b": 126}[config.stem.split("elsa-swin-")[1][0]]
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == expected


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
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(
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


def small_config(tmp_path: Path, iters: int = 12, ckpt: int = 6) -> Path:
    data = write_ade(tmp_path / "ade")
    path = tmp_path / "small_upernet.py"
    path.write_text(
        SMALL.format(
            config=REPO / "seg" / "configs" / "elsa_swin" / "upernet_elsa-swin-t_8xb2-160k_ade20k-512x512.py",
            data=data,
            classes=SEG_CLASSES,
            iters=iters,
            ckpt=ckpt,
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
    config = small_config(tmp_path, iters=4, ckpt=4)
    work = tmp_path / "work"
    r = run_upstream("mmseg", "train.py", [str(config), "--work-dir", str(work)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(losses(work)) == 4
    r = run_upstream("mmseg", "test.py", [str(config), str(work / "iter_4.pth"), "--work-dir", str(work)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "mIoU" in r.stdout + r.stderr


def test_bad_inputs(tmp_path):
    config = small_config(tmp_path)
    r = run_tool("seg", ["tools/test.py", str(config), str(tmp_path / "x.pth"), "--eval", "mIoU"])
    assert r.returncode != 0 and "x.pth does not exist" in r.stderr
    torch.save({}, tmp_path / "x.pth")
    r = run_tool("seg", ["tools/test.py", str(config), str(tmp_path / "x.pth"), "--eval", "mAP"])
    assert r.returncode != 0 and "--eval mAP" in r.stderr
    r = run_tool("seg", ["tools/test.py", str(config), str(tmp_path / "x.pth"), "--eval", "mIoU"])
    assert r.returncode != 0 and "x.pth does not fit the model of" in r.stderr.strip().splitlines()[-1], r.stderr[
        -3000:
    ]
    r = run_tool(
        "seg",
        ["tools/train.py", str(config), "--work-dir", str(tmp_path / "w"), "--cfg-options", "train_cfg.max_iters=-1"],
    )
    assert r.returncode != 0 and "error: train_cfg.max_iters=-1" in r.stderr.strip().splitlines()[-1]
