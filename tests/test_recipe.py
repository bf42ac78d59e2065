"""The det/seg configs hold the original's training recipe, value by value.

The original is github.com/damo-cv/ELSA (mmdet 2 / mmseg 0.x configs); every expected value below names
the file of that repository it comes from. Each merged config (mmengine ``Config.fromfile``) is checked,
and the model it builds too: the ELSA values are read from the built backbone's layers, not only from
config keys. Where we differ on purpose, ``DELIBERATE`` says so and the tests hold that difference.
"""

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

from mm_helpers import REPO, build_model, num_params  # noqa: E402

pytestmark = pytest.mark.mm

# ----------------------------------------------------------------------------------------------------------
# The original's files (paths in damo-cv/ELSA).
DET_CONFIG = "det/configs/elsa_swin/{}.py"  # mask_elsa_tiny_1x, cascade_elsa_small_3x, ...
DET_MODEL_BASE = "det/configs/_base_/models/mask_rcnn_elsa_swin_fpn.py"
DET_CASCADE_BASE = "det/configs/_base_/models/cascade_mask_rcnn_elsa_swin_fpn.py"
DET_DATASET = "det/configs/_base_/datasets/coco_instance.py"
DET_SCHEDULE = "det/configs/_base_/schedules/schedule_1x.py"
DET_BACKBONE = "det/mmdet/models/backbones/elsa_swin.py"
DET_TRAIN_API = "det/mmdet/apis/train.py"
SEG_CONFIG = "seg/configs/elsa_swin/{}.py"  # upernet_elsa_tiny_160k, upernet_elsa_small_160k
SEG_MODEL_BASE = "seg/configs/_base_/models/upernet_elsa_swin.py"
SEG_DATASET = "seg/configs/_base_/datasets/ade20k.py"
SEG_SCHEDULE = "seg/configs/_base_/schedules/schedule_160k.py"
SEG_TEST_TOOL = "seg/tools/test.py"

# Our config -> the original config it reproduces (None: ours, with no original and no published number).
ORIGINAL_CONFIG = {
    "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco": "mask_elsa_tiny_1x",
    "mask-rcnn_elsa-swin-t_fpn_ms-crop-3x_coco": "mask_elsa_tiny_3x",
    "mask-rcnn_elsa-swin-s_fpn_ms-crop-1x_coco": "mask_elsa_small_1x",
    "mask-rcnn_elsa-swin-s_fpn_ms-crop-3x_coco": "mask_elsa_small_3x",
    "cascade-mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco": "cascade_elsa_tiny_1x",
    "cascade-mask-rcnn_elsa-swin-t_fpn_ms-crop-3x_coco": "cascade_elsa_tiny_3x",
    "cascade-mask-rcnn_elsa-swin-s_fpn_ms-crop-1x_coco": "cascade_elsa_small_1x",
    "cascade-mask-rcnn_elsa-swin-s_fpn_ms-crop-3x_coco": "cascade_elsa_small_3x",
    "upernet_elsa-swin-t_8xb2-160k_ade20k-512x512": "upernet_elsa_tiny_160k",
    "upernet_elsa-swin-s_8xb2-160k_ade20k-512x512": "upernet_elsa_small_160k",
    "upernet_elsa-swin-b_8xb2-160k_ade20k-512x512": None,
}
# The Swin baselines: the original's configs/swin/ (det: mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_1x_coco,
# cascade_mask_rcnn_swin_..._giou_4conv1f_adamw_3x_coco; seg: upernet_swin_tiny_patch4_window7_512x512_160k_ade20k),
# the ELSA-Swin recipe with mmdet's / mmseg's SwinTransformer.
SWIN_ORIGINAL_CONFIG = {
    "mask-rcnn_swin-t_fpn_ms-crop-1x_coco": "mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_1x_coco",
    "mask-rcnn_swin-t_fpn_ms-crop-3x_coco": "mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco",
    "mask-rcnn_swin-s_fpn_ms-crop-3x_coco": "mask_rcnn_swin_small_patch4_window7_mstrain_480-800_adamw_3x_coco",
    "cascade-mask-rcnn_swin-t_fpn_ms-crop-1x_coco": "cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_1x_coco",
    "cascade-mask-rcnn_swin-t_fpn_ms-crop-3x_coco": "cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco",
    "cascade-mask-rcnn_swin-s_fpn_ms-crop-3x_coco": "cascade_mask_rcnn_swin_small_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco",
    "cascade-mask-rcnn_swin-b_fpn_ms-crop-3x_coco": "cascade_mask_rcnn_swin_base_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco",
    "upernet_swin-t_8xb2-160k_ade20k-512x512": "upernet_swin_tiny_patch4_window7_512x512_160k_ade20k",
    "upernet_swin-s_8xb2-160k_ade20k-512x512": "upernet_swin_small_patch4_window7_512x512_160k_ade20k",
    "upernet_swin-b_8xb2-160k_ade20k-512x512": "upernet_swin_base_patch4_window7_512x512_160k_ade20k",
}
ORIGINAL_CONFIG.update(SWIN_ORIGINAL_CONFIG)

# ----------------------------------------------------------------------------------------------------------
# Per model: the values that differ between configs. Source: the original config of ORIGINAL_CONFIG
# (backbone.depths / num_heads / embed_dim / drop_path_rate / group_width, lr_config.step, runner.max_epochs),
# except the group width 8 of the S models, which their configs leave at ELSASwin's default (DET_BACKBONE:
# ``group_width=8``; the seg backbone is the same file). The B segmentation model is ours: Swin-B's sizes,
# the S group width, the T recipe.
T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), group_width=4)
S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), group_width=8)
B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), group_width=8)
PER_MODEL = {
    "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco": dict(T, drop_path=0.1, epochs=12, steps=(8, 11)),
    "mask-rcnn_elsa-swin-t_fpn_ms-crop-3x_coco": dict(T, drop_path=0.2, epochs=36, steps=(27, 33)),
    "mask-rcnn_elsa-swin-s_fpn_ms-crop-1x_coco": dict(S, drop_path=0.2, epochs=12, steps=(8, 11)),
    "mask-rcnn_elsa-swin-s_fpn_ms-crop-3x_coco": dict(S, drop_path=0.75, epochs=36, steps=(27, 33)),
    "cascade-mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco": dict(T, drop_path=0.0, epochs=12, steps=(8, 11)),
    "cascade-mask-rcnn_elsa-swin-t_fpn_ms-crop-3x_coco": dict(T, drop_path=0.2, epochs=36, steps=(27, 33)),
    "cascade-mask-rcnn_elsa-swin-s_fpn_ms-crop-1x_coco": dict(S, drop_path=0.2, epochs=12, steps=(8, 11)),
    "cascade-mask-rcnn_elsa-swin-s_fpn_ms-crop-3x_coco": dict(S, drop_path=0.75, epochs=36, steps=(27, 33)),
    "upernet_elsa-swin-t_8xb2-160k_ade20k-512x512": dict(T, drop_path=0.3, iters=160000),
    "upernet_elsa-swin-s_8xb2-160k_ade20k-512x512": dict(S, drop_path=0.3, iters=160000),
    "upernet_elsa-swin-b_8xb2-160k_ade20k-512x512": dict(B, drop_path=0.3, iters=160000),
    # The Swin baselines: backbone.embed_dim / depths / num_heads / drop_path_rate, lr_config.step and
    # runner.max_epochs of the original's configs/swin/ files.
    "mask-rcnn_swin-t_fpn_ms-crop-1x_coco": dict(T, drop_path=0.1, epochs=12, steps=(8, 11)),
    "mask-rcnn_swin-t_fpn_ms-crop-3x_coco": dict(T, drop_path=0.2, epochs=36, steps=(27, 33)),
    "mask-rcnn_swin-s_fpn_ms-crop-3x_coco": dict(S, drop_path=0.2, epochs=36, steps=(27, 33)),
    "cascade-mask-rcnn_swin-t_fpn_ms-crop-1x_coco": dict(T, drop_path=0.0, epochs=12, steps=(8, 11)),
    "cascade-mask-rcnn_swin-t_fpn_ms-crop-3x_coco": dict(T, drop_path=0.2, epochs=36, steps=(27, 33)),
    "cascade-mask-rcnn_swin-s_fpn_ms-crop-3x_coco": dict(S, drop_path=0.2, epochs=36, steps=(27, 33)),
    "cascade-mask-rcnn_swin-b_fpn_ms-crop-3x_coco": dict(B, drop_path=0.3, epochs=36, steps=(27, 33)),
    "upernet_swin-t_8xb2-160k_ade20k-512x512": dict(T, drop_path=0.3, iters=160000),
    "upernet_swin-s_8xb2-160k_ade20k-512x512": dict(S, drop_path=0.3, iters=160000),
    "upernet_swin-b_8xb2-160k_ade20k-512x512": dict(B, drop_path=0.3, iters=160000),
}

# ----------------------------------------------------------------------------------------------------------
# The values every det / seg model shares: (value, source in the original).
BACKBONE = {
    "patch_size": (4, f"{DET_BACKBONE}: ELSASwin(patch_size=4)"),
    "window_size": (7, f"{DET_CONFIG} / {SEG_CONFIG}: backbone.window_size"),
    "mlp_ratio": (4.0, f"{DET_MODEL_BASE} / {SEG_MODEL_BASE}: backbone.mlp_ratio"),
    "qkv_bias": (True, f"{DET_MODEL_BASE} / {SEG_MODEL_BASE}: backbone.qkv_bias"),
    "out_indices": ((0, 1, 2, 3), f"{DET_MODEL_BASE} / {SEG_MODEL_BASE}: backbone.out_indices"),
    "elsa_stages": ((0, 1, 2), f"{DET_BACKBONE}: ELSASwinBlock in all stages but the last"),
    "elsa_kernel": (7, f"{DET_BACKBONE}: ELSASwin(elsa_kernel=7)"),
    "lam": (0, f"{DET_BACKBONE}: ELSASwin(lam=0)"),
    "gamma": (1, f"{DET_BACKBONE}: ELSASwin(gamma=1)"),
    # ELSA layers: ``qk_scale=qk_scale if i_layer == self.num_layers - 1 else 1``
    "elsa_qk_scale": (1.0, f"{DET_BACKBONE}: BasicLayer(qk_scale=1) in the ELSA stages"),
    # window attention of the last stage: qk_scale=None -> head_dim ** -0.5
    "window_qk_scale": ("head_dim ** -0.5", f"{DET_MODEL_BASE}: backbone.qk_scale=None"),
    # ``dpr = torch.linspace(0, drop_path_rate, sum(depths))``, one rate per block in order
    "drop_path_rule": ("linspace(0, rate, blocks)", f"{DET_BACKBONE}: stochastic depth decay rule"),
}
DET = {
    "neck": (
        dict(type="FPN", in_channels=[96, 192, 384, 768], out_channels=256, num_outs=5),
        f"{DET_CONFIG}: neck.in_channels; {DET_MODEL_BASE}: neck",
    ),
    "optimizer": (
        dict(type="AdamW", lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
        f"{DET_CONFIG}: optimizer",
    ),
    "custom_keys": (
        {
            "absolute_pos_embed": dict(decay_mult=0.0),
            "relative_position_bias_table": dict(decay_mult=0.0),
            "norm": dict(decay_mult=0.0),
        },
        f"{DET_CONFIG}: optimizer.paramwise_cfg.custom_keys",
    ),
    "grad_clip": (None, f"{DET_CONFIG}: optimizer_config.grad_clip=None"),
    "warmup": (
        dict(iters=500, ratio=0.001),
        f"{DET_SCHEDULE}: lr_config warmup='linear', warmup_iters=500, warmup_ratio=0.001",
    ),
    "lr_gamma": (0.1, f"{DET_SCHEDULE}: lr_config policy='step' (mmcv's default gamma 0.1)"),
    "batch_per_gpu": (2, f"{DET_DATASET}: data.samples_per_gpu=2"),
    "train_flip": (0.5, f"{DET_CONFIG}: train_pipeline RandomFlip(flip_ratio=0.5)"),
    "train_scales": (
        [(s, 1333) for s in range(480, 801, 32)],
        f"{DET_CONFIG}: train_pipeline AutoAugment policy 1, and policy 2 after the crop",
    ),
    "crop_scales": ([(400, 1333), (500, 1333), (600, 1333)], f"{DET_CONFIG}: AutoAugment policy 2 Resize"),
    "crop": (
        dict(crop_type="absolute_range", crop_size=(384, 600), allow_negative_crop=True),
        f"{DET_CONFIG}: AutoAugment policy 2 RandomCrop",
    ),
    "test_scale": ((1333, 800), f"{DET_DATASET}: test_pipeline MultiScaleFlipAug(img_scale=(1333, 800), flip=False)"),
    "pad_size_divisor": (32, f"{DET_DATASET}: Pad(size_divisor=32)"),
    "mean_std_rgb": (
        ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375], True),
        f"{DET_DATASET}: img_norm_cfg",
    ),
    "rpn_test": (dict(nms_pre=1000, max_per_img=1000, iou_threshold=0.7), f"{DET_MODEL_BASE}: test_cfg.rpn"),
    "rcnn_test": (
        dict(score_thr=0.05, iou_threshold=0.5, max_per_img=100, mask_thr_binary=0.5),
        f"{DET_MODEL_BASE}: test_cfg.rcnn",
    ),
    "mask_rpn_proposal": (dict(nms_pre=2000, max_per_img=1000), f"{DET_MODEL_BASE}: train_cfg.rpn_proposal"),
    "cascade_rpn_proposal": (dict(nms_pre=2000, max_per_img=2000), f"{DET_CASCADE_BASE}: train_cfg.rpn_proposal"),
    "cascade_stages": (3, f"{DET_CASCADE_BASE}: roi_head.num_stages"),
    "cascade_loss_weights": ([1, 0.5, 0.25], f"{DET_CASCADE_BASE}: roi_head.stage_loss_weights"),
    "cascade_iou_thrs": ([0.5, 0.6, 0.7], f"{DET_CASCADE_BASE}: train_cfg.rcnn[i].assigner.pos_iou_thr"),
    "cascade_head": (
        dict(num_shared_convs=4, num_shared_fcs=1, conv_out_channels=256, fc_out_channels=1024),
        f"{DET_CONFIG} (cascade_*): roi_head.bbox_head[i] ConvFCBBoxHead, SyncBN",
    ),
    "cascade_loss": (
        dict(bbox="GIoULoss", bbox_weight=10.0, reg_decoded_bbox=True, reg_class_agnostic=False),
        f"{DET_CONFIG} (cascade_*): roi_head.bbox_head[i].loss_bbox, reg_decoded_bbox",
    ),
    "cascade_stds": (
        [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]],
        f"{DET_CONFIG} (cascade_*): roi_head.bbox_head[i].bbox_coder.target_stds",
    ),
}
SEG = {
    "decode_head": (
        dict(type="UPerHead", in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6), channels=512, num_classes=150),
        f"{SEG_MODEL_BASE}: decode_head; {SEG_CONFIG}: num_classes=150",
    ),
    "auxiliary_head": (
        dict(type="FCNHead", in_index=2, channels=256, num_convs=1, num_classes=150, loss_weight=0.4),
        f"{SEG_MODEL_BASE}: auxiliary_head; {SEG_CONFIG}: num_classes=150",
    ),
    "test_mode": ("whole", f"{SEG_MODEL_BASE}: test_cfg.mode"),
    "optimizer": (
        dict(type="AdamW", lr=6e-05, betas=(0.9, 0.999), weight_decay=0.01),
        f"{SEG_CONFIG}: optimizer",
    ),
    "custom_keys": (DET["custom_keys"][0], f"{SEG_CONFIG}: optimizer.paramwise_cfg.custom_keys"),
    "warmup": (dict(iters=1500, ratio=1e-6), f"{SEG_CONFIG}: lr_config warmup='linear' 1500 iterations, 1e-6"),
    "poly": (dict(power=1.0, min_lr=0.0), f"{SEG_CONFIG}: lr_config policy='poly', power=1.0, min_lr=0.0"),
    "batch_per_gpu": (2, f"{SEG_CONFIG}: data=dict(samples_per_gpu=2)"),
    "intervals": (16000, f"{SEG_SCHEDULE}: checkpoint_config and evaluation interval=16000"),
    "train_resize": (
        dict(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
        f"{SEG_DATASET}: Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))",
    ),
    "train_crop": (dict(crop_size=(512, 512), cat_max_ratio=0.75), f"{SEG_DATASET}: RandomCrop"),
    "train_flip": (0.5, f"{SEG_DATASET}: RandomFlip(prob=0.5)"),
    "pad": (dict(size=(512, 512), pad_val=0, seg_pad_val=255), f"{SEG_DATASET}: Pad(size=crop_size, seg_pad_val=255)"),
    "test_scale": ((2048, 512), f"{SEG_DATASET}: test_pipeline MultiScaleFlipAug(img_scale=(2048, 512))"),
    "tta_ratios": (
        (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
        f"{SEG_DATASET}: test_pipeline img_ratios (validation and test, no flip); {SEG_TEST_TOOL}: --aug-test "
        "sets these ratios and flip=True",
    ),
    "mean_std_rgb": (DET["mean_std_rgb"][0], f"{SEG_DATASET}: img_norm_cfg"),
}
# Shared by both: the published models were trained with 8 GPUs x 2 images. The original states this in its
# seg configs ("By default, models are trained on 8 GPUs with 2 images per GPU", SEG_CONFIG); for detection
# it is the convention of the mmdet 2 configs it comes from (``8x2`` in their names).
IMAGES_PER_STEP = (16, f"{SEG_CONFIG}: comment above data=dict(samples_per_gpu=2)")

# Where we differ from the original on purpose.
DELIBERATE = {
    "stage4_table_decay": (
        "The original names stage 4's relative-position table `rb`, so the custom key "
        "'relative_position_bias_table' misses it and it is decayed; ours has Swin's name and is not decayed.",
        f"{DET_BACKBONE}: WindowAttention.rb",
    ),
    "det_mixed_precision": (
        "The original trains detection in apex O1 mixed precision; ours uses torch.amp (AmpOptimWrapper). O1 "
        "patched torch for the whole process, so its validation after each epoch ran in mixed precision too: "
        "ours does when training does (AmpValidationHook); its test tool ran in float32, as ours.",
        f"{DET_CONFIG}: optimizer_config use_fp16=True; {DET_TRAIN_API}: apex.amp.initialize(opt_level='O1')",
    ),
}

ELSA_CONFIGS = sorted((REPO / "det" / "configs" / "elsa_swin").glob("*.py")) + sorted(
    (REPO / "seg" / "configs" / "elsa_swin").glob("*.py")
)
SWIN_CONFIGS = sorted((REPO / "det" / "configs" / "swin").glob("*.py")) + sorted(
    (REPO / "seg" / "configs" / "swin").glob("*.py")
)
DET_CONFIGS = [p for p in ELSA_CONFIGS + SWIN_CONFIGS if p.parents[2].name == "det"]
SEG_CONFIGS = [p for p in ELSA_CONFIGS + SWIN_CONFIGS if p.parents[2].name == "seg"]
ALL_CONFIGS = DET_CONFIGS + SEG_CONFIGS


def value(table: dict, key: str):
    return table[key][0]


@pytest.fixture(scope="module", params=ALL_CONFIGS, ids=lambda p: p.stem)
def built(request):
    """(config path, merged config, model built on the meta device)."""
    cfg, model = build_model(request.param)
    return request.param, cfg, model


def test_every_config_is_in_the_table():
    assert sorted(p.stem for p in ALL_CONFIGS) == sorted(ORIGINAL_CONFIG) == sorted(PER_MODEL)
    assert sorted(p.stem for p in SWIN_CONFIGS) == sorted(SWIN_ORIGINAL_CONFIG)


def _transform(pipeline, type_: str) -> dict:
    found = [t for t in pipeline if t["type"] == type_]
    assert len(found) == 1, (type_, pipeline)
    return found[0]


# ----------------------------------------------------------------------------------------------------------
# Backbone


def test_backbone_hyper_parameters(built):
    """The built backbone: sizes, window attention, MLP, and the ELSA layers' kernel, lam, gamma, group
    width and q*k scale, read from the layers themselves."""
    from elsa_op import ELSAAttention

    config, cfg, model = built
    if config in SWIN_CONFIGS:
        _check_swin_backbone(config, cfg, model)
        return
    want = PER_MODEL[config.stem]
    backbone = model.backbone
    assert cfg.model.backbone.type == "ELSASwin"
    assert backbone.patch_embed.proj.kernel_size == (value(BACKBONE, "patch_size"),) * 2
    assert backbone.patch_embed.proj.out_channels == want["embed_dim"]
    assert tuple(backbone.out_indices) == value(BACKBONE, "out_indices")
    assert tuple(len(stage.blocks) for stage in backbone.layers) == want["depths"]
    elsa_stages = tuple(
        i for i, stage in enumerate(backbone.layers) if all(isinstance(b.attn, ELSAAttention) for b in stage.blocks)
    )
    assert elsa_stages == value(BACKBONE, "elsa_stages")
    for i, stage in enumerate(backbone.layers):
        dim = want["embed_dim"] * 2**i
        heads = want["num_heads"][i]
        for block in stage.blocks:
            attn = block.attn
            assert attn.num_heads == heads
            assert block.mlp.fc1.in_features == dim
            assert block.mlp.fc1.out_features == dim * value(BACKBONE, "mlp_ratio")
            if i in elsa_stages:
                assert attn.kernel_size == value(BACKBONE, "elsa_kernel")
                assert attn.lam == value(BACKBONE, "lam") and attn.gamma == value(BACKBONE, "gamma")
                assert attn.scale == value(BACKBONE, "elsa_qk_scale")
                # the grouped K x K conv that makes the attention: channels per group, and q/k channels
                # as the original rounds them (dim // 3 * 2 up to whole groups)
                conv = attn.attn[0]
                group_width = conv.in_channels // conv.groups
                assert group_width == want["group_width"]
                assert conv.in_channels == math.ceil(dim // 3 * 2 / group_width) * group_width
                assert conv.kernel_size == (value(BACKBONE, "elsa_kernel"),) * 2
                assert (attn.pre_proj.bias is not None) == value(BACKBONE, "qkv_bias")
            else:
                assert tuple(block.window_size) == (value(BACKBONE, "window_size"),) * 2
                assert attn.scale == pytest.approx((dim // heads) ** -0.5)
                assert (attn.qkv.bias is not None) == value(BACKBONE, "qkv_bias")


def _drop_paths(block) -> list:
    """A block's two drop-path layers: ELSA-Swin's (timm's names), or mmdet's / mmseg's Swin's."""
    if hasattr(block, "drop_path1"):
        return [block.drop_path1, block.drop_path2]
    return [block.attn.drop, block.ffn.dropout_layer]


def _stages(backbone) -> list:
    return list(backbone.layers if hasattr(backbone, "layers") else backbone.stages)


def test_drop_path(built):
    """One rate per block, rising linearly from 0 over all blocks to the config's rate."""
    config, cfg, model = built
    want = PER_MODEL[config.stem]
    assert cfg.model.backbone.drop_path_rate == want["drop_path"]
    rates = [
        getattr(layer, "drop_prob", 0.0)
        for stage in _stages(model.backbone)
        for block in stage.blocks
        for layer in _drop_paths(block)
    ]
    expected = torch.linspace(0, want["drop_path"], sum(want["depths"])).repeat_interleave(2).tolist()
    assert rates == pytest.approx(expected)


def test_weight_decay_groups(built):
    """mmengine's optimizer constructor with the config's custom keys: in the backbone exactly the LayerNorm
    parameters go without weight decay, as in the original (its norms all have "norm" in their names), plus
    the relative-position tables: ELSA-Swin's of stage 4 (DELIBERATE: the original's are named `rb` and
    decayed), Swin's of every stage (the original's too)."""
    from mmengine.optim import DefaultOptimWrapperConstructor

    config, cfg, model = built
    wrapper_cfg = dict(cfg.optim_wrapper, type="OptimWrapper")  # AmpOptimWrapper needs a GPU to build
    paramwise = wrapper_cfg.pop("paramwise_cfg")
    model = model.to_empty(device="cpu")
    wrapper = DefaultOptimWrapperConstructor(wrapper_cfg, paramwise)(model)
    decay = {id(p): group["weight_decay"] for group in wrapper.optimizer.param_groups for p in group["params"]}
    norms = {id(p) for m in model.backbone.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    swin = config in SWIN_CONFIGS
    stages = _stages(model.backbone) if swin else _stages(model.backbone)[-1:]
    tables = {id(b.attn.w_msa.relative_position_bias_table if swin else b.attn.relative_position_bias_table)
              for stage in stages for b in stage.blocks}  # fmt: skip
    wd = cfg.optim_wrapper.optimizer.weight_decay
    for name, p in model.backbone.named_parameters():
        want = 0.0 if id(p) in norms | tables else wd
        assert decay[id(p)] == want, name
    assert len(tables) == sum(PER_MODEL[config.stem]["depths"][slice(None) if swin else slice(-1, None)])


def _check_swin_backbone(config, cfg, model) -> None:
    """The Swin baselines: mmdet's / mmseg's SwinTransformer with the sizes of the original's configs/swin/
    (embed_dim, depths, num_heads; window 7, MLP ratio 4, qkv bias, q*k scaled by head_dim ** -0.5, no
    absolute position embedding)."""
    want = PER_MODEL[config.stem]
    backbone = model.backbone
    assert cfg.model.backbone.type == "SwinTransformer" and not backbone.use_abs_pos_embed
    assert backbone.patch_embed.projection.kernel_size == (value(BACKBONE, "patch_size"),) * 2
    assert backbone.patch_embed.projection.out_channels == want["embed_dim"]
    assert tuple(backbone.out_indices) == value(BACKBONE, "out_indices")
    assert tuple(len(stage.blocks) for stage in backbone.stages) == want["depths"]
    for i, stage in enumerate(backbone.stages):
        dim, heads = want["embed_dim"] * 2**i, want["num_heads"][i]
        for block in stage.blocks:
            attn = block.attn.w_msa
            assert attn.num_heads == heads and tuple(attn.window_size) == (value(BACKBONE, "window_size"),) * 2
            assert attn.scale == pytest.approx((dim // heads) ** -0.5)
            assert (attn.qkv.bias is not None) == value(BACKBONE, "qkv_bias")
            assert block.ffn.layers[0][0].out_features == dim * value(BACKBONE, "mlp_ratio")


# ----------------------------------------------------------------------------------------------------------
# What the configs say: every top-level variable is one the Runner, mmdet / mmseg or their tools read, or
# a variable of mmdet's / mmseg's dataset bases that holds what the config uses.

READ_BY_THE_RUNNER = {
    "model", "work_dir", "train_dataloader", "val_dataloader", "test_dataloader", "train_cfg", "val_cfg",
    "test_cfg", "auto_scale_lr", "optim_wrapper", "param_scheduler", "val_evaluator", "test_evaluator",
    "default_hooks", "custom_hooks", "load_from", "resume", "launcher", "env_cfg", "log_processor", "log_level",
    "visualizer", "vis_backends", "default_scope", "randomness", "custom_imports", "tta_model", "tta_pipeline",
}  # fmt: skip
# The variables of mmdet's and mmseg's bases: the dataset's, and mmseg's model base's norms (the heads'
# norm_cfg, and backbone_norm_cfg: LayerNorm, which both the ELSA-Swin and the Swin backbones use).
DATASET_VARIABLES = {
    "dataset_type", "data_root", "backend_args", "crop_size", "data_preprocessor", "norm_cfg", "img_ratios",
    "backbone_norm_cfg",
}  # fmt: skip


def unscoped(node):
    """A config value without the ``_scope_`` mmengine writes into what a config takes from mmdet's / mmseg's
    files."""
    if isinstance(node, dict):
        return {k: unscoped(v) for k, v in node.items() if k != "_scope_"}
    return [unscoped(v) for v in node] if isinstance(node, list | tuple) else node


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: p.stem)
def test_config_variables_are_what_it_uses(config):
    """train_pipeline / test_pipeline are the pipelines the dataloaders run (mmdet's browse_dataset.py and
    every other reader of cfg.train_pipeline see the real one), and no optimizer, checkpoint or recipe variable
    is left that nothing uses."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))

    assert unscoped(cfg.train_pipeline) == unscoped(cfg.train_dataloader.dataset.pipeline)
    test = unscoped(cfg.test_pipeline)
    assert test == unscoped(cfg.val_dataloader.dataset.pipeline) == unscoped(cfg.test_dataloader.dataset.pipeline)
    extra = set(cfg) - READ_BY_THE_RUNNER - DATASET_VARIABLES - {"train_pipeline", "test_pipeline", "optimizer"}
    assert extra == set(), extra
    if "optimizer" in cfg:  # mmseg's schedule base names the optimizer of its optim_wrapper
        assert unscoped(cfg.optimizer) == unscoped(cfg.optim_wrapper.optimizer)
    if "norm_cfg" in cfg:  # mmseg's model base: the norm of both heads
        norms = (cfg.norm_cfg, cfg.model.decode_head.norm_cfg, cfg.model.auxiliary_head.norm_cfg)
        assert unscoped(norms[0]) == unscoped(norms[1]) == unscoped(norms[2])
    if "data_preprocessor" in cfg:
        assert unscoped(cfg.data_preprocessor).items() <= unscoped(cfg.model.data_preprocessor).items()
    if "backbone_norm_cfg" in cfg:
        assert (
            cfg.backbone_norm_cfg.type == "LN"
            and cfg.model.backbone.get("norm_cfg", cfg.backbone_norm_cfg).type == "LN"
        )


# ----------------------------------------------------------------------------------------------------------
# Optimizer, schedule, batch


def _lr_curve(cfg, steps_per_epoch: int, points):
    """The learning rate (relative to the base) the config's schedulers give at each iteration in points,
    stepping them as mmengine's Runner does (iteration-based ones every iteration, epoch-based ones at the
    end of every epoch)."""
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS

    param = torch.nn.Parameter(torch.zeros(1))
    wrapper = OptimWrapper(torch.optim.SGD([param], lr=1.0))
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in cfg.param_scheduler]
    out, wanted = {}, set(points)
    for it in range(max(points) + 1):
        if it in wanted:
            out[it] = wrapper.optimizer.param_groups[0]["lr"]
        for s in schedulers:
            if not s.by_epoch:
                s.step()
        if (it + 1) % steps_per_epoch == 0:
            for s in schedulers:
                if s.by_epoch:
                    s.step()
    return [out[p] for p in points]


@pytest.mark.parametrize("config", DET_CONFIGS, ids=lambda p: p.stem)
def test_det_optimizer_and_schedule(config):
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))
    want = PER_MODEL[config.stem]
    optimizer = dict(cfg.optim_wrapper.optimizer)
    optimizer["betas"] = tuple(optimizer["betas"])
    assert optimizer == value(DET, "optimizer")
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == value(DET, "custom_keys")
    assert cfg.optim_wrapper.get("clip_grad") == value(DET, "grad_clip")
    assert cfg.optim_wrapper.type == "AmpOptimWrapper"  # DELIBERATE["det_mixed_precision"]
    assert cfg.train_cfg.type == "EpochBasedTrainLoop" and cfg.train_cfg.max_epochs == want["epochs"]
    assert cfg.train_cfg.val_interval == 1  # the original evaluates after every epoch (mmdet 2's default)
    # the original's curve: mmcv's step policy (x0.1 at each step epoch) times its linear warm-up factor,
    # 1 - (1 - t / 500) * (1 - 0.001) for the first 500 iterations; checked on COCO's 7330 iterations per epoch
    warmup, epoch = value(DET, "warmup"), 7330
    points = [0, 1, 250, warmup["iters"] - 1, warmup["iters"], epoch * want["steps"][0] - 1]
    points += [epoch * s for s in want["steps"]] + [epoch * want["epochs"] - 1]

    def original(t):
        factor = value(DET, "lr_gamma") ** sum(t // epoch >= s for s in want["steps"])
        if t < warmup["iters"]:
            factor *= 1 - (1 - t / warmup["iters"]) * (1 - warmup["ratio"])
        return factor

    assert _lr_curve(cfg, epoch, points) == pytest.approx([original(t) for t in points], rel=1e-9)


@pytest.mark.parametrize("config", SEG_CONFIGS, ids=lambda p: p.stem)
def test_seg_optimizer_and_schedule(config):
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))
    want = PER_MODEL[config.stem]
    optimizer = dict(cfg.optim_wrapper.optimizer)
    optimizer["betas"] = tuple(optimizer["betas"])
    assert optimizer == value(SEG, "optimizer")
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == value(SEG, "custom_keys")
    assert cfg.optim_wrapper.type == "OptimWrapper"  # the original trains segmentation in float32
    assert cfg.train_cfg.type == "IterBasedTrainLoop" and cfg.train_cfg.max_iters == want["iters"]
    assert cfg.train_cfg.val_interval == value(SEG, "intervals")
    assert cfg.default_hooks.checkpoint.interval == value(SEG, "intervals")
    assert cfg.default_hooks.checkpoint.by_epoch is False
    # the original's curve: mmcv's poly (1 - t / 160000) ** 1.0 down to 0, times its linear warm-up factor
    # 1 - (1 - t / 1500) * (1 - 1e-6) for the first 1500 iterations
    warmup, poly, n = value(SEG, "warmup"), value(SEG, "poly"), want["iters"]
    points = [0, 1, 750, warmup["iters"] - 1, warmup["iters"], warmup["iters"] + 1, 80000, n - 1]

    def original(t):
        factor = (1 - t / n) ** poly["power"] * (1 - poly["min_lr"]) + poly["min_lr"]
        if t < warmup["iters"]:
            factor *= 1 - (1 - t / warmup["iters"]) * (1 - warmup["ratio"])
        return factor

    assert _lr_curve(cfg, n, points) == pytest.approx([original(t) for t in points], rel=1e-9)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: p.stem)
def test_batch_and_images_per_step(config):
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))
    table = DET if config in DET_CONFIGS else SEG
    assert cfg.train_dataloader.batch_size == value(table, "batch_per_gpu")
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=IMAGES_PER_STEP[0])


# ----------------------------------------------------------------------------------------------------------
# Data: training and test scales, crops, test-time augmentation


def _sizes_after(pipeline, sizes):
    """(height, width) of blank images of each size after the pipeline's transforms (built from config)."""
    import numpy as np
    from mmcv.transforms import Compose

    transforms = Compose(pipeline)
    out = []
    for h, w in sizes:
        results = transforms(dict(img=np.zeros((h, w, 3), np.uint8), img_shape=(h, w), ori_shape=(h, w)))
        out.append(results["img"].shape[:2])
    return out


def _fit(h: int, w: int, scale) -> tuple[int, int]:
    """The original's keep-ratio resize (mmcv 1.x ``imrescale``): the largest size with the image's aspect
    ratio that fits scale = (long edge, short edge), rounded half up."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


SIZES = [(256, 256), (512, 683), (1024, 2048), (480, 640), (2000, 300)]


@pytest.mark.parametrize("config", DET_CONFIGS, ids=lambda p: p.stem)
def test_det_data(config):
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    cfg = Config.fromfile(str(config))
    train = cfg.train_dataloader.dataset.pipeline
    assert _transform(train, "LoadAnnotations") == dict(type="LoadAnnotations", with_bbox=True, with_mask=True)
    assert _transform(train, "RandomFlip").prob == value(DET, "train_flip")
    assert [t["type"] for t in train].index("RandomFlip") < [t["type"] for t in train].index("RandomChoice")
    plain, cropped = _transform(train, "RandomChoice").transforms
    train_scales = sorted(tuple(s) for s in value(DET, "train_scales"))
    assert [t["type"] for t in plain] == ["RandomChoiceResize"]
    assert sorted(tuple(s) for s in plain[0].scales) == train_scales and plain[0].keep_ratio
    assert [t["type"] for t in cropped] == ["RandomChoiceResize", "RandomCrop", "RandomChoiceResize"]
    assert sorted(tuple(s) for s in cropped[0].scales) == value(DET, "crop_scales") and cropped[0].keep_ratio
    crop = {k: v for k, v in cropped[1].items() if k != "type"}
    crop["crop_size"] = tuple(crop["crop_size"])
    assert crop == value(DET, "crop")
    assert sorted(tuple(s) for s in cropped[2].scales) == train_scales and cropped[2].keep_ratio
    # single-scale test: fit (1333, 800), keeping the aspect ratio, pad to multiples of 32, no flip
    test = cfg.test_dataloader.dataset.pipeline
    resize = _transform(test, "Resize")
    assert tuple(resize.scale) == value(DET, "test_scale") and resize.keep_ratio
    assert not any(t["type"] in ("RandomFlip", "TestTimeAug") for t in test)
    assert _sizes_after([resize], SIZES) == [_fit(h, w, value(DET, "test_scale")) for h, w in SIZES]
    pre = cfg.model.data_preprocessor
    assert pre.pad_size_divisor == value(DET, "pad_size_divisor")
    assert (pre.mean, pre.std, pre.bgr_to_rgb) == value(DET, "mean_std_rgb")


@pytest.mark.parametrize("config", SEG_CONFIGS, ids=lambda p: p.stem)
def test_seg_data(config):
    from mmengine.config import Config
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(str(config))
    train = cfg.train_dataloader.dataset.pipeline
    assert _transform(train, "LoadAnnotations").reduce_zero_label is True
    assert [t["type"] for t in train] == [
        "LoadImageFromFile",
        "LoadAnnotations",
        "RandomResize",
        "RandomCrop",
        "RandomFlip",
        "PhotoMetricDistortion",
        "PackSegInputs",
    ]
    resize = _transform(train, "RandomResize")
    assert resize.get("keep_ratio") is True  # mmseg 0.x's Resize kept the ratio by default
    assert dict(scale=tuple(resize.scale), ratio_range=tuple(resize.ratio_range), keep_ratio=True) == value(
        SEG, "train_resize"
    )
    crop = _transform(train, "RandomCrop")
    assert dict(crop_size=tuple(crop.crop_size), cat_max_ratio=crop.cat_max_ratio) == value(SEG, "train_crop")
    assert _transform(train, "RandomFlip").prob == value(SEG, "train_flip")
    assert cfg.train_dataloader.dataset.type == "ADE20KDataset"
    pre = cfg.model.data_preprocessor
    assert dict(size=tuple(pre.size), pad_val=pre.pad_val, seg_pad_val=pre.seg_pad_val) == value(SEG, "pad")
    assert (pre.mean, pre.std, pre.bgr_to_rgb) == value(SEG, "mean_std_rgb")
    # validation and the default test run the multi-scale views of test_seg_test_time_augmentation (without
    # flips) through loops that merge them (DELIBERATE: none left; the original's single-scale Resize was
    # wrapped in its MultiScaleFlipAug with six ratios)
    assert cfg.val_cfg.type == "MultiViewValLoop" and cfg.test_cfg.type == "MultiViewTestLoop"


@pytest.mark.parametrize("flip", [False, True], ids=["test", "aug-test"])
@pytest.mark.parametrize("config", SEG_CONFIGS, ids=lambda p: p.stem)
def test_seg_test_time_augmentation(config, flip, tmp_path):
    """The config's test pipeline (validation, tools/test.py) and tta_pipeline (what --aug-test and mmseg's
    --tta run), from image files: at each ratio r the image fits (2048 r, 512 r) keeping its aspect ratio,
    as the original's MultiScaleFlipAug(img_scale=(2048, 512), img_ratios=...) made it; with --aug-test
    once as it is and once flipped."""
    from mmcv.transforms import Compose
    from mmengine.config import Config
    from mmseg.utils import register_all_modules
    from PIL import Image

    register_all_modules()
    cfg = Config.fromfile(str(config))
    assert cfg.tta_model.type == "SegTTAModel"
    pipeline = Compose(cfg.tta_pipeline if flip else cfg.test_dataloader.dataset.pipeline)
    scale, ratios = value(SEG, "test_scale"), value(SEG, "tta_ratios")
    for h, w in [(256, 256), (512, 683), (1024, 2048)]:
        image, label = tmp_path / f"{h}x{w}.jpg", tmp_path / f"{h}x{w}.png"
        Image.new("RGB", (w, h), (90, 120, 150)).save(image)
        Image.new("L", (w, h), 3).save(label)
        results = pipeline(dict(img_path=str(image), seg_map_path=str(label), reduce_zero_label=True, seg_fields=[]))
        got = sorted(
            (tuple(x.shape[-2:]), s.metainfo.get("flip", False))
            for x, s in zip(results["inputs"], results["data_samples"], strict=True)
        )
        want = sorted((_fit(h, w, (int(scale[0] * r), int(scale[1] * r))), f) for r in ratios for f in {False, flip})
        assert got == want, (h, w)
        # the label stays at the image's own size: predictions are scored there
        assert all(tuple(s.gt_sem_seg.data.shape[-2:]) == (h, w) for s in results["data_samples"])


# ----------------------------------------------------------------------------------------------------------
# Heads


@pytest.mark.parametrize("config", DET_CONFIGS, ids=lambda p: p.stem)
def test_det_heads(config):
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))
    model = cfg.model
    dims = [PER_MODEL[config.stem]["embed_dim"] * 2**i for i in range(4)]  # [96, ..., 768]; Swin-B 128, ...
    neck = {k: model.neck[k] for k in ("type", "in_channels", "out_channels", "num_outs")}
    assert neck == dict(value(DET, "neck"), in_channels=dims)
    rpn, rcnn = model.test_cfg.rpn, model.test_cfg.rcnn
    assert dict(nms_pre=rpn.nms_pre, max_per_img=rpn.max_per_img, iou_threshold=rpn.nms.iou_threshold) == value(
        DET, "rpn_test"
    )
    assert dict(
        score_thr=rcnn.score_thr,
        iou_threshold=rcnn.nms.iou_threshold,
        max_per_img=rcnn.max_per_img,
        mask_thr_binary=rcnn.mask_thr_binary,
    ) == value(DET, "rcnn_test")
    proposal = model.train_cfg.rpn_proposal
    cascade = config.stem.startswith("cascade")
    assert dict(nms_pre=proposal.nms_pre, max_per_img=proposal.max_per_img) == value(
        DET, "cascade_rpn_proposal" if cascade else "mask_rpn_proposal"
    )
    assert model.roi_head.mask_head.type == "FCNMaskHead" and model.roi_head.mask_head.num_convs == 4
    if not cascade:
        assert model.type == "MaskRCNN" and model.roi_head.bbox_head.type == "Shared2FCBBoxHead"
        return
    assert model.type == "CascadeRCNN"
    assert model.roi_head.num_stages == value(DET, "cascade_stages")
    assert model.roi_head.stage_loss_weights == value(DET, "cascade_loss_weights")
    assert [stage.assigner.pos_iou_thr for stage in model.train_cfg.rcnn] == value(DET, "cascade_iou_thrs")


def test_heads_built(built):
    """The built heads. Cascade: three bbox heads of 4 shared convs (SyncBN) + 1 fc, GIoU loss x10 on
    decoded boxes, the original's per-stage target stds. Mask R-CNN: mmdet's 2fc head. UPerNet: the
    decode head and the FCN auxiliary head on stage 3."""
    from mmdet.models.losses import GIoULoss

    config, cfg, model = built
    if config in SEG_CONFIGS:
        decode, aux = model.decode_head, model.auxiliary_head
        assert type(decode).__name__ == "UPerHead" and type(aux).__name__ == "FCNHead"
        assert decode.channels == value(SEG, "decode_head")["channels"]
        assert aux.in_index == value(SEG, "auxiliary_head")["in_index"]
        assert decode.num_classes == aux.num_classes == 150
        return
    cascade = config.stem.startswith("cascade")
    mask_heads = model.roi_head.mask_head if cascade else [model.roi_head.mask_head]  # one per cascade stage
    assert len(mask_heads) == (value(DET, "cascade_stages") if cascade else 1)
    assert all(type(h).__name__ == "FCNMaskHead" and len(h.convs) == 4 for h in mask_heads)
    if not cascade:
        assert type(model.roi_head.bbox_head).__name__ == "Shared2FCBBoxHead"
        return
    heads = model.roi_head.bbox_head
    assert len(heads) == value(DET, "cascade_stages")
    shape, loss = value(DET, "cascade_head"), value(DET, "cascade_loss")
    for head, stds in zip(heads, value(DET, "cascade_stds"), strict=True):
        assert (head.num_shared_convs, head.num_shared_fcs) == (shape["num_shared_convs"], shape["num_shared_fcs"])
        assert head.conv_out_channels == shape["conv_out_channels"]
        assert head.fc_out_channels == shape["fc_out_channels"]
        assert all(isinstance(conv.bn, torch.nn.SyncBatchNorm) for conv in head.shared_convs)
        assert isinstance(head.loss_bbox, GIoULoss) and head.loss_bbox.loss_weight == loss["bbox_weight"]
        assert head.reg_decoded_bbox is loss["reg_decoded_bbox"]
        assert head.reg_class_agnostic is loss["reg_class_agnostic"]
        assert head.num_classes == 80
        assert list(head.bbox_coder.stds) == pytest.approx(stds)


@pytest.mark.parametrize("config", SEG_CONFIGS, ids=lambda p: p.stem)
def test_seg_heads(config):
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))
    want = PER_MODEL[config.stem]
    dims = [want["embed_dim"] * 2**i for i in range(4)]
    decode, aux = cfg.model.decode_head, cfg.model.auxiliary_head
    expected = value(SEG, "decode_head")
    assert {k: decode[k] for k in expected} == expected and decode.in_channels == dims
    expected = dict(value(SEG, "auxiliary_head"))
    assert aux.loss_decode.loss_weight == expected.pop("loss_weight")
    assert {k: aux[k] for k in expected} == expected and aux.in_channels == dims[2]
    assert decode.norm_cfg.type == aux.norm_cfg.type == "SyncBN"
    assert cfg.model.test_cfg.mode == value(SEG, "test_mode")


# ----------------------------------------------------------------------------------------------------------
# Metafiles: every entry's config exists and builds a model of the stated size; results are the published ones.

# The original's published results (its README), per config.
PUBLISHED = {
    "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco": {"box AP": 45.7, "mask AP": 41.1},
    "mask-rcnn_elsa-swin-t_fpn_ms-crop-3x_coco": {"box AP": 47.5, "mask AP": 42.7},
    "mask-rcnn_elsa-swin-s_fpn_ms-crop-1x_coco": {"box AP": 48.3, "mask AP": 43.0},
    "mask-rcnn_elsa-swin-s_fpn_ms-crop-3x_coco": {"box AP": 49.2, "mask AP": 43.6},
    "cascade-mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco": {"box AP": 49.8, "mask AP": 43.0},
    "cascade-mask-rcnn_elsa-swin-t_fpn_ms-crop-3x_coco": {"box AP": 51.0, "mask AP": 44.2},
    "cascade-mask-rcnn_elsa-swin-s_fpn_ms-crop-1x_coco": {"box AP": 51.6, "mask AP": 44.4},
    "cascade-mask-rcnn_elsa-swin-s_fpn_ms-crop-3x_coco": {"box AP": 52.3, "mask AP": 45.2},
    "upernet_elsa-swin-t_8xb2-160k_ade20k-512x512": {"mIoU(ms+flip)": 47.9},
    "upernet_elsa-swin-s_8xb2-160k_ade20k-512x512": {"mIoU(ms+flip)": 50.4},
}


def _metafile_models():
    import yaml

    index = yaml.safe_load((REPO / "model-index.yml").read_text())
    assert sorted(index["Import"]) == ["det/metafile.yml", "seg/metafile.yml"]
    models = []
    for path in index["Import"]:
        meta = yaml.safe_load((REPO / path).read_text())
        collections = {c["Name"] for c in meta["Collections"]}
        for entry in meta["Models"]:
            assert entry["In Collection"] in collections, entry["Name"]
            models.append(entry)
    return models


def _results(entry) -> list:
    results = entry.get("Results") or []
    return [results] if isinstance(results, dict) else results  # mmseg writes one result as a mapping


def test_metafiles_name_every_config_once_with_the_published_results():
    models = _metafile_models()
    assert sorted(m["Name"] for m in models) == sorted(ORIGINAL_CONFIG)
    for m in models:
        assert Path(m["Config"]).stem == m["Name"]
        metrics = {k: v for r in _results(m) for k, v in r["Metrics"].items()}
        assert metrics == PUBLISHED.get(m["Name"], {}), m["Name"]
        for r in _results(m):
            assert r["Dataset"] == ("COCO" if "coco" in m["Name"] else "ADE20K")
        want = PER_MODEL[m["Name"]]
        meta = m["Metadata"]
        if "epochs" in want:
            assert meta["Epochs"] == want["epochs"] and meta["Training Data"] == "COCO"
        else:
            assert meta["Iterations"] == want["iters"] and meta["Training Data"] == "ADE20K"
        assert meta["Batch Size"] == IMAGES_PER_STEP[0]


def _stated_precision(stated) -> tuple[float, float]:
    """(value, tolerance) of a Parameters entry: an integer is exact, "48.65M" is good to half a unit of its
    last digit."""
    if isinstance(stated, int):
        return stated, 0
    text = str(stated).removesuffix("M")
    decimals = len(text.partition(".")[2])
    return float(text) * 1e6, 0.5 * 10 ** (6 - decimals)


def test_metafile_parameters_match_the_built_model(built):
    """The metafile entry of each config names its file and the parameter count of the model it builds."""
    config, _, model = built
    (entry,) = [m for m in _metafile_models() if m["Name"] == config.stem]
    assert (REPO / entry["Config"]).resolve() == config.resolve(), entry["Config"]
    stated, tolerance = _stated_precision(entry["Metadata"]["Parameters"])
    assert abs(num_params(model) - stated) <= tolerance, (num_params(model), stated)
