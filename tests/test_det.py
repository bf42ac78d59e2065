"""det: the ELSA-Swin backbone in mmdetection, the eight configs, and train -> test -> resume runs."""

import json
from pathlib import Path

import pytest
import torch

mmdet = pytest.importorskip("mmdet")

DATA = Path(__file__).parent / "data"  # the reference tensors of the original code

from mm_data import CLASSES, write_coco  # noqa: E402
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

CONFIGS = sorted((REPO / "det" / "configs" / "elsa_swin").glob("*.py"))
# README: the dense backbone reproduces the original's feature maps within this.
DENSE_ATOL = 1e-5


def test_dense_parity_with_original():
    from elsa_mm import ELSASwin
    from elsa_swin import map_original_names

    ref = torch.load(DATA / "elsa_swin_dense_narrow.pt", weights_only=False)
    model = ELSASwin(**ref["config"]).eval()
    model.load_state_dict(map_original_names(ref["state_dict"], model), strict=False)
    with torch.no_grad():
        feats = model(ref["input"])
    for got, want in zip(feats, ref["features"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=DENSE_ATOL)


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_dense_manifest_maps_onto_backbone(size):
    from elsa_mm import ELSASwin
    from elsa_swin import map_original_names

    manifest = json.loads((DATA / "dense_backbone_state_dict_manifest.json").read_text())[size]
    with torch.device("meta"):
        model = ELSASwin(**manifest["config"])
        published = {k: torch.empty(s) for k, s in manifest["state_dict"].items()}
    mapped = map_original_names(published, model)
    ours = model.state_dict()
    assert sorted(mapped) == sorted(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


def test_backbone_loads_classification_checkpoints(tmp_path):
    """Our classifier's checkpoint and the original's both load into the backbone through init_cfg."""
    import timm

    import elsa_swin  # noqa: F401  (registers the classifiers)
    from elsa_mm import ELSASwin

    ref = torch.load(DATA / "elsa_swin_cls_narrow.pt", weights_only=False)
    cfg = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), group_width=4)
    classifier = timm.create_model("elsa_swin_nano", num_classes=10)
    for name, state in [
        ("original.pth", {"model": ref["state_dict"]}),
        ("ours.pth", {"state_dict": classifier.state_dict()}),
    ]:
        torch.save(state, tmp_path / name)
        backbone = ELSASwin(**cfg, init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / name)))
        backbone.init_weights()
        # every backbone weight but the per-output norms came from the checkpoint, nothing was left over
        missing, unexpected = backbone.load_pretrained(str(tmp_path / name))
        assert missing == [f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")] and unexpected == []
        source = (
            ref["state_dict"]["patch_embed.proj.weight"]
            if name == "original.pth"
            else classifier.patch_embed.proj.weight
        )
        torch.testing.assert_close(backbone.patch_embed.proj.weight, source)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(config):
    cfg, model = build_model(config)
    assert cfg.model.backbone.type == "ELSASwin"
    assert cfg.optim_wrapper.optimizer.type == "AdamW" and cfg.optim_wrapper.optimizer.lr == 1e-4
    # the published models' sizes (README): Mask R-CNN T/S 49M/72M, Cascade Mask R-CNN T/S 86M/110M
    assert round(num_params(model) / 1e6) == published_mparams(config)


SMALL = """
_base_ = '{config}'
data_root = '{data}/'
metainfo = dict(classes={classes})
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(
    data_root=data_root, ann_file='train.json', data_prefix=dict(img='images/'), metainfo=metainfo,
    pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(
    data_root=data_root, ann_file='val.json', data_prefix=dict(img='images/'), metainfo=metainfo,
    pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'val.json')
test_evaluator = val_evaluator
model = dict(backbone=dict(drop_path_rate=0.0), test_cfg=dict(rcnn=dict(score_thr=0.0)))  # report mAP even when unsure
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=2e-4))
train_cfg = dict(max_epochs={epochs}, val_interval=100)
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=2))
"""


def small_config(tmp_path: Path, name: str, epochs: int) -> Path:
    data = write_coco(tmp_path / "coco")
    path = tmp_path / f"small_{name}"
    path.write_text(
        SMALL.format(config=REPO / "det" / "configs" / "elsa_swin" / name, data=data, classes=CLASSES, epochs=epochs)
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py", "cascade-mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py"]
)
def test_train_then_test_then_resume(tmp_path, name):
    config = small_config(tmp_path, name, epochs=3)
    work = tmp_path / "work"
    heads = (
        [f"model.roi_head.bbox_head.{i}.num_classes=2" for i in range(3)]
        if name.startswith("cascade")
        else ["model.roi_head.bbox_head.num_classes=2"]
    )
    two_classes = ["--cfg-options", *heads, "model.roi_head.mask_head.num_classes=2"]
    r = run_tool("det", ["tools/train.py", str(config), "--work-dir", str(work), *two_classes])
    assert r.returncode == 0, r.stderr[-4000:]
    values = losses(work)
    assert len(values) == 12 and falling(values), values
    ckpt = work / "epoch_3.pth"
    r = run_tool(
        "det",
        ["tools/test.py", str(config), str(ckpt), "--eval", "bbox", "segm", "--work-dir", str(work), *two_classes],
    )
    assert r.returncode == 0, r.stderr[-4000:]
    out = r.stdout + r.stderr
    assert "coco/bbox_mAP" in out and "coco/segm_mAP" in out
    # resume from epoch 2 and run the last epoch again (the checkpoint holds numpy scalars)
    r = run_tool(
        "det",
        [
            "tools/train.py",
            str(config),
            "--work-dir",
            str(tmp_path / "resumed"),
            "--resume",
            str(work / "epoch_2.pth"),
            *two_classes,
        ],
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(losses(tmp_path / "resumed")) == 4  # epoch 3's iterations only
    assert (tmp_path / "resumed" / "epoch_3.pth").exists()


@pytest.mark.slow
def test_mmdet_own_tools_train_and_test_our_config(tmp_path):
    """Once the project is installed, mmdet's installed tools/train.py and tools/test.py take our configs."""
    config = small_config(tmp_path, "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py", epochs=1)
    work = tmp_path / "work"
    two_classes = ["--cfg-options", "model.roi_head.bbox_head.num_classes=2", "model.roi_head.mask_head.num_classes=2"]
    # --auto-scale-lr: the config's lr (2e-4 here) was set for 16 images per step, this run takes 2
    r = run_upstream(
        "mmdet", "train.py", [str(config), "--work-dir", str(work), "--auto-scale-lr", *two_classes], cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(losses(work)) == 4
    assert scalars(work, "lr")[-1] == pytest.approx(2e-4 * 2 / 16)
    r = run_upstream(
        "mmdet",
        "test.py",
        [str(config), str(work / "epoch_1.pth"), "--work-dir", str(work), *two_classes],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "coco/bbox_mAP" in r.stdout + r.stderr


def test_test_refuses_a_checkpoint_of_another_model(tmp_path, monkeypatch):
    """A checkpoint that does not hold the detector's weights is refused, not tested with random heads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = small_config(tmp_path, "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py", epochs=1)
    from elsa_mm import ELSASwin

    other = ELSASwin(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), group_width=4)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in other.state_dict().items()}}, tmp_path / "other.pth")
    message = tool_error("det", "test", [config, tmp_path / "other.pth", "--work-dir", tmp_path / "w"])
    assert message.startswith(f"error: {tmp_path / 'other.pth'} does not fit the model of"), message


def test_original_detector_checkpoint_maps_onto_the_backbone():
    """The published COCO models hold the original's backbone names under "backbone.": loading the whole
    detector's state dict maps them, with torch's loader and with mmengine's (what load_from runs)."""
    from mmengine.runner.checkpoint import load_state_dict

    from elsa_mm import ELSASwin

    ref = torch.load(DATA / "elsa_swin_dense_narrow.pt", weights_only=False)
    published = {f"backbone.{k}": v for k, v in ref["state_dict"].items()}
    wrapper = torch.nn.Module()
    wrapper.backbone = ELSASwin(**ref["config"]).eval()
    missing, unexpected = wrapper.load_state_dict(published, strict=False)
    assert missing == [] and unexpected == []
    wrapper.backbone = ELSASwin(**ref["config"]).eval()
    load_state_dict(wrapper, published, strict=False)
    with torch.no_grad():
        feats = wrapper.backbone(ref["input"])
    for got, want in zip(feats, ref["features"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=DENSE_ATOL)


def test_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    message = tool_error("det", "train", [tmp_path / "nope.py"])
    assert "config file" in message and "does not exist" in message
    config = small_config(tmp_path, "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py", epochs=1)
    message = tool_error("det", "test", [config, tmp_path / "missing.pth", "--eval", "bbox"])
    assert "missing.pth does not exist" in message
    message = tool_error("det", "test", [config, tmp_path / "missing.pth", "--eval", "bbox", "mIoU"])
    assert message == "error: --eval mIoU: the evaluator knows bbox, segm, proposal"
    message = tool_error(
        "det", "train", [config, "--work-dir", tmp_path / "w", "--cfg-options", "train_cfg.max_epochs=-1"]
    )
    assert message.startswith("error: train_cfg.max_epochs=-1")
    (tmp_path / "coco" / "train.json").unlink()
    with pytest.raises(FileNotFoundError, match="train.json"):
        load_tool("det", "train").main([str(config), "--work-dir", str(tmp_path / "w")])


def test_pretrained_option_and_frozen_stages(tmp_path):
    import argparse

    from elsa_mm import ELSASwin
    from elsa_mm.tools import load_config

    ckpt = tmp_path / "cls.pth"
    torch.save({}, ckpt)
    config = REPO / "det" / "configs" / "elsa_swin" / "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py"
    args = argparse.Namespace(
        config=str(config),
        cfg_options={"model.pretrained": str(ckpt), "model.backbone.use_checkpoint": True},
        launcher="none",
        work_dir=str(tmp_path),
        local_rank=0,
    )
    cfg = load_config(args)
    assert "pretrained" not in cfg.model
    assert cfg.model.backbone.init_cfg == dict(type="Pretrained", checkpoint=str(ckpt))
    assert cfg.model.backbone.use_checkpoint is True

    model = ELSASwin(
        embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), group_width=4, frozen_stages=2, use_checkpoint=True
    ).train()
    frozen = {
        n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("layers") else "")
        for n, p in model.named_parameters()
        if not p.requires_grad
    }
    assert frozen == {"patch_embed", "layers.0", "layers.1", "norm0", "norm1"}
    assert not model.layers[1].training and model.layers[2].training
    feats = model(torch.randn(1, 3, 61, 93))  # any size, padded inside
    sum(f.sum() for f in feats).backward()
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_mmengine_complexity_analysis_counts_the_elsa_op():
    """get_model_complexity_info (mmdet's get_flops.py) counts the op's multiply-adds."""
    from mmengine.analysis import FlopAnalyzer

    from elsa_mm import ELSASwin

    backbone = ELSASwin(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), group_width=4).eval()
    counts = FlopAnalyzer(backbone, torch.randn(1, 3, 64, 64)).by_operator()
    # two ELSA blocks per stage at 16x16x32, 8x8x64, 4x4x128; 7x7 taps; additive ghost kernel only
    assert counts["elsa_forward"] == 2 * 49 * (16 * 16 * 32 + 8 * 8 * 64 + 4 * 4 * 128)


def test_mmengine_checkpoints_are_written_atomically(tmp_path, monkeypatch, full_disk):
    """Through SafeCheckpointHook (or our tools), mmengine's checkpoint writes go through a temporary file:
    a failed write (here a full disk) keeps the previous file whole and leaves nothing behind."""
    from mmengine.runner.checkpoint import save_checkpoint

    from elsa_mm import write_checkpoints_atomically
    from elsa_swin import files

    write_checkpoints_atomically()
    path = tmp_path / "iter_2.pth"
    save_checkpoint({"meta": {"iter": 1}}, str(path))
    full_disk()
    with pytest.raises(files.NoSpaceError, match=f"no space left on {tmp_path}"):
        save_checkpoint({"meta": {"iter": 2}}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"meta": {"iter": 1}}
    assert [p.name for p in tmp_path.iterdir()] == ["iter_2.pth"]


def test_resume_from_a_partial_checkpoint_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = small_config(tmp_path, "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py", epochs=1)
    partial = tmp_path / "iter_2.pth"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, partial)
    partial.write_bytes(partial.read_bytes()[:300])
    message = tool_error("det", "train", [config, "--work-dir", tmp_path / "w", "--resume", partial])
    assert message.startswith(f"error: checkpoint {partial} is truncated"), message


def test_train_auto_scale_lr_hands_the_runner_the_published_batch(tmp_path, monkeypatch):
    """--auto-scale-lr turns on the config's auto_scale_lr (base 16 images = 8 GPUs x 2), which mmengine's
    Runner applies; a config without one is refused."""
    import elsa_mm.tools

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    seen = []

    class Runner:
        @staticmethod
        def from_cfg(cfg):
            seen.append(cfg)
            return Runner()

        def train(self):
            pass

    monkeypatch.setattr(elsa_mm.tools, "Runner", Runner)
    config = REPO / "det" / "configs" / "elsa_swin" / "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py"
    train = load_tool("det", "train")
    train.main([str(config), "--work-dir", str(tmp_path / "w")])
    train.main([str(config), "--work-dir", str(tmp_path / "w"), "--auto-scale-lr"])
    assert [cfg.auto_scale_lr for cfg in seen] == [
        dict(enable=False, base_batch_size=16),
        dict(enable=True, base_batch_size=16),
    ]
    bare = tmp_path / "bare.py"
    bare.write_text(f"_base_ = '{config}'\nauto_scale_lr = None\n")
    message = tool_error("det", "train", [bare, "--auto-scale-lr"])
    assert message.startswith(f"error: --auto-scale-lr: {bare} has no auto_scale_lr"), message


MASK_T = REPO / "det" / "configs" / "elsa_swin" / "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py"


def test_original_train_flags(tmp_path, monkeypatch):
    """The original's tools/train.py flags, each on the config the Runner gets."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    seen = capture_runs(monkeypatch)
    ckpt = tmp_path / "detector.pth"
    torch.save({"state_dict": {}}, ckpt)
    train = load_tool("det", "train")
    train.main([str(MASK_T)])
    assert seen[-1].get("randomness") is None and seen[-1].val_cfg.type == "ValLoop"
    assert seen[-1].load_from is None
    # --options is the original's (deprecated) name of --cfg-options; --gpus 1 is one process's GPU
    argv = [
        "--seed",
        "7",
        "--deterministic",
        "--no-validate",
        "--load-from",
        ckpt,
        "--options",
        "train_cfg.max_epochs=2",
    ]
    train.main([str(MASK_T), *map(str, argv), "--gpus", "1"])
    cfg = seen[-1]
    assert cfg.randomness == dict(seed=7, deterministic=True)
    assert cfg.val_cfg is None and cfg.val_dataloader is None and cfg.val_evaluator is None  # no validation loop
    assert cfg.load_from == str(ckpt) and not cfg.get("resume")
    assert cfg.train_cfg.max_epochs == 2
    assert tool_error("det", "train", [MASK_T, "--gpus", "2"]) == (
        "error: --gpus 2: one process trains on one GPU; train on 2 GPUs with tools/dist_train.sh CONFIG 2"
    )
    message = tool_error("det", "train", [MASK_T, "--gpu-ids", "0", "3"])
    assert "CUDA_VISIBLE_DEVICES=0,3 tools/dist_train.sh CONFIG 2" in message, message
    message = tool_error("det", "train", [MASK_T, "--load-from", ckpt, "--resume", ckpt])
    assert message.startswith("error: --load-from and --resume"), message
    message = tool_error("det", "train", [MASK_T, "--load-from", tmp_path / "nope.pth"])
    assert "nope.pth does not exist" in message, message
    message = tool_error("det", "train", [MASK_T, "--options", "a=1", "--cfg-options", "b=2"])
    assert message.startswith("error: --options is the original's name of --cfg-options"), message


def test_tools_leave_the_process_group(tmp_path, monkeypatch):
    """train and test leave the gloo group they joined, also when the run fails: a group left to the
    interpreter's exit could abort a finished run's process."""
    import socket

    import torch.distributed as dist

    import elsa_mm.tools

    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = capture_runs(monkeypatch)
    groups = []

    def fail(self):
        groups.append(dist.is_initialized())
        raise RuntimeError("the run failed")

    monkeypatch.setattr(elsa_mm.tools.Runner, "train", fail)
    train = load_tool("det", "train")
    with pytest.raises(RuntimeError, match="the run failed"):
        train.main([str(MASK_T), "--launcher", "pytorch"])
    assert groups == [True] and not dist.is_initialized()
    assert seen[-1].model_wrapper_cfg.device_ids is None
    ckpt = tmp_path / "detector.pth"
    torch.save({"state_dict": {}}, ckpt)
    load_tool("det", "test").main([str(MASK_T), str(ckpt), "--launcher", "pytorch"])
    assert len(seen) == 2 and not dist.is_initialized()


def test_original_test_flags(tmp_path, monkeypatch):
    """The original's tools/test.py flags, each on the config the Runner gets."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    seen = capture_runs(monkeypatch)
    ckpt = tmp_path / "detector.pth"
    torch.save({"state_dict": {}}, ckpt)
    test = load_tool("det", "test")
    argv = [MASK_T, ckpt, "--format-only", "--eval-options", "jsonfile_prefix=out/coco", "classwise=True"]
    test.main([*map(str, argv), "--show-dir", "pictures", "--show-score-thr", "0.5", "--fuse-conv-bn"])
    cfg = seen[-1]
    (evaluator,) = cfg.test_evaluator
    assert evaluator.type == "CocoMetric" and evaluator.format_only is True
    assert evaluator.outfile_prefix == "out/coco" and evaluator.classwise is True
    hook = cfg.default_hooks.visualization
    assert hook.draw is True and hook.test_out_dir == str(tmp_path / "pictures") and hook.score_thr == 0.5
    assert hook.get("show", False) is False
    assert dict(type="FuseConvBNHook") in cfg.custom_hooks
    # --format-only alone writes to the work dir; --options is the original's name of --eval-options here
    test.main([str(MASK_T), str(ckpt), "--format-only", "--work-dir", "w", "--options", "classwise=True", "--show"])
    (evaluator,) = seen[-1].test_evaluator
    assert evaluator.outfile_prefix == "w/results" and evaluator.classwise is True
    assert seen[-1].default_hooks.visualization.show is True
    test.main([str(MASK_T), str(ckpt), "--gpu-collect"])
    assert dict(type="CollectResultsHook", device="gpu", tmpdir=None) in seen[-1].custom_hooks
    test.main([str(MASK_T), str(ckpt), "--tmpdir", "parts"])
    assert dict(type="CollectResultsHook", device="cpu", tmpdir="parts") in seen[-1].custom_hooks
    for argv, start in [
        (["--eval", "bbox", "--format-only"], "error: --eval and --format-only"),
        (["--eval-options", "jsonfile=x"], "error: --eval-options jsonfile: CocoMetric takes ann_file, metric"),
        (["--gpu-collect", "--tmpdir", "t"], "error: --gpu-collect and --tmpdir"),
        (["--out", "results.json"], "error: --out results.json: the predictions are written as a pickle"),
        (["--options", "a=1", "--eval-options", "b=2"], "error: --options is the original's name of --eval-options"),
    ]:
        message = tool_error("det", "test", [MASK_T, ckpt, *argv])
        assert message.startswith(start), message


def test_fuse_conv_bn_hook_keeps_the_outputs():
    """--fuse-conv-bn's hook folds every BatchNorm of the (wrapped) model into its convolution before the
    test; the outputs stay."""
    from types import SimpleNamespace

    from mmcv.cnn import ConvModule

    from elsa_mm import FuseConvBNHook

    model = torch.nn.Sequential(*[ConvModule(4, 4, 3, padding=1, norm_cfg=dict(type="BN")) for _ in range(3)])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 4, 8, 8)
    want = model(x)
    FuseConvBNHook().before_test(SimpleNamespace(model=model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_collect_results_hook_sets_every_metric():
    from types import SimpleNamespace

    from elsa_mm import CollectResultsHook

    metrics = [SimpleNamespace(collect_device="cpu", collect_dir=None) for _ in range(2)]
    runner = SimpleNamespace(test_loop=SimpleNamespace(evaluator=SimpleNamespace(metrics=metrics)))
    CollectResultsHook(device="cpu", tmpdir="parts").before_test(runner)
    assert [(m.collect_device, m.collect_dir) for m in metrics] == [("cpu", "parts")] * 2
    CollectResultsHook(device="gpu").before_test(runner)
    assert [(m.collect_device, m.collect_dir) for m in metrics] == [("gpu", None)] * 2
    with pytest.raises(ValueError, match="a tmpdir goes only with device='cpu'"):
        CollectResultsHook(device="gpu", tmpdir="parts")


# The small configs, smaller: what the distributed runs need is the processes, not the model. A narrow
# ELSA-Swin, and 64 RoIs (not 512) a training image, 100 proposals (not 1000) a test image.
NARROW = [
    "model.backbone.embed_dim=32",
    "model.backbone.depths=[2,2,2,2]",
    "model.backbone.num_heads=[1,2,4,8]",
    "model.neck.in_channels=[32,64,128,256]",
    "model.train_cfg.rpn_proposal.max_per_img=100",
    "model.train_cfg.rcnn.sampler.num=64",
    "model.test_cfg.rpn.max_per_img=100",
]


@pytest.mark.slow
def test_distributed_train_and_test_on_cpu(tmp_path):
    """tools/slurm_train.sh (srun and scontrol stood in for), then tools/dist_test.sh, 2 processes each on
    CPUs; the 2-process test scores as the 1-process one, whose --show-dir pictures are written."""
    config = small_config(tmp_path, "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py", epochs=1)
    two_classes = ["model.roi_head.bbox_head.num_classes=2", "model.roi_head.mask_head.num_classes=2"]
    options = ["--cfg-options", *NARROW, *two_classes]
    work = tmp_path / "work"
    env = fake_slurm(tmp_path)
    env.update(GPUS="2", GPUS_PER_NODE="2", CPUS_PER_TASK="1", SRUN_ARGS="--quotatype=auto")
    r = run_script("det", "slurm_train.sh", ["cpus", "elsa", config, work, "--seed", "0", *options], env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    srun_args = json.loads((tmp_path / "srun_args.json").read_text())
    tool = str(REPO / "det" / "tools" / "train.py")
    assert srun_args[:9] == [
        "-p",
        "cpus",
        "--job-name=elsa",
        "--gres=gpu:2",
        "--ntasks=2",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--kill-on-bad-exit=1",
        "--quotatype=auto",
    ]
    assert srun_args[10:14] == ["-u", tool, str(config), "--work-dir"] and srun_args[-2:] == ["--launcher", "slurm"]
    assert len(losses(work)) == 2  # 8 images, 2 processes x 2 images a step
    ckpt = work / "epoch_1.pth"
    r = run_script("det", "dist_test.sh", [config, ckpt, 2, "--work-dir", tmp_path / "dist", *options])
    assert r.returncode == 0, r.stderr[-4000:]
    distributed = logged_metrics(tmp_path / "dist")
    single = load_tool("det", "test").main(
        [
            str(config),
            str(ckpt),
            "--work-dir",
            str(tmp_path / "single"),
            "--show-dir",
            str(tmp_path / "pictures"),
            *options,
        ]
    )
    assert "coco/bbox_mAP" in single and "coco/segm_mAP" in single
    assert {k: v for k, v in distributed.items() if k.startswith("coco/")} == single
    assert len(list((tmp_path / "pictures").glob("*.jpg"))) == 4  # --show-dir: one picture per image


def test_amp_validation_hook_follows_training():
    """The det configs validate in mixed precision when training is (AmpOptimWrapper), as the original's
    apex O1 did for the whole process, and in float32 otherwise."""
    from types import SimpleNamespace

    from mmengine.config import Config
    from mmengine.optim import AmpOptimWrapper, OptimWrapper

    from elsa_mm import AmpValidationHook

    assert dict(type="AmpValidationHook") in Config.fromfile(str(MASK_T)).custom_hooks
    amp = object.__new__(AmpOptimWrapper)  # building one needs a GPU; the hook only looks at its type
    plain = OptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    # (training's wrapper, the config's val_cfg.fp16) -> validation in fp16; a config's own fp16 stays
    for wrapper, asked, fp16 in ((amp, False, True), (plain, False, False), (plain, True, True), (amp, True, True)):
        val_loop = SimpleNamespace(fp16=asked)
        AmpValidationHook().before_train(SimpleNamespace(optim_wrapper=wrapper, val_loop=val_loop))
        assert val_loop.fp16 is fp16
    AmpValidationHook().before_train(SimpleNamespace(optim_wrapper=amp, val_loop=None))  # --no-validate
