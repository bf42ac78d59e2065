# UPerNet with ELSA-Swin-T, 512x512 crops, 160k iterations, ADE20K (150 classes). The recipe is Swin's
# (mmseg's Swin UPerNet config, on the same bases): AdamW lr 6e-5 / wd 0.01 without decay on norms and
# position tables, 2 images per GPU, FCN auxiliary head on stage 3.
_base_ = [
    "mmseg::_base_/models/upernet_swin.py",
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_160k.py",
]
custom_imports = dict(imports=["elsa_mm"], allow_failed_imports=False)
# Checkpoints that torch.load(weights_only=True) reads, with mmseg's own tools too.
custom_hooks = [dict(type="SafeCheckpointHook")]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type="ELSASwin",
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        group_width=4,
        drop_path_rate=0.3,
        use_checkpoint=False,
        out_indices=(0, 1, 2, 3),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150),
)
# mmseg's schedule base names its (SGD) optimizer: here, the one the optim_wrapper uses.
optimizer = dict(_delete_=True, type="AdamW", lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01)
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            "absolute_pos_embed": dict(decay_mult=0.0),
            "relative_position_bias_table": dict(decay_mult=0.0),
            "norm": dict(decay_mult=0.0),
        }
    ),
)
# The original's schedule (mmcv's poly with a linear warm-up): the learning rate at iteration t is
# 6e-5 * (1 - t / 160000) times the warm-up factor 1e-6 + (1 - 1e-6) * t / 1500 for t < 1500. Both schedulers
# run from iteration 0 and multiply; mmengine's reach their end value at iteration end - 1, hence 1501 and
# 160001. (mmseg's Swin config starts the poly decay at iteration 1500 instead.)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1501),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=0, end=160001, by_epoch=False),
]
# The published models were trained with 16 images per step (8 GPUs x 2): on fewer GPUs, --auto-scale-lr
# scales the learning rate by (GPUs x 2) / 16.
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)

# Testing as the original's: at each ratio r the image is resized, keeping its aspect ratio, to the largest
# size that fits (2048 r, 512 r) (its MultiScaleFlipAug(img_scale=(2048, 512), img_ratios=...); mmseg's own
# ade20k tta_pipeline rescales the raw image by r instead, which agrees only for images whose short side is
# already 512). Validation during training and tools/test.py: the six ratios without flip, their class
# probabilities averaged (the loops below give the model the six views). --aug-test (mmseg's --tta):
# the six ratios, each also flipped (tta_pipeline, the setting of the published mIoU).
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(
        type="TestTimeAug",
        transforms=[
            [dict(type="Resize", scale=(int(2048 * r), int(512 * r)), keep_ratio=True) for r in img_ratios],
            [dict(type="LoadAnnotations", reduce_zero_label=True)],
            [dict(type="PackSegInputs")],
        ],
    ),
]
val_dataloader = dict(batch_size=1, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
val_cfg = dict(type="MultiViewValLoop")
test_cfg = dict(type="MultiViewTestLoop")
tta_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(
        type="TestTimeAug",
        transforms=[
            [dict(type="Resize", scale=(int(2048 * r), int(512 * r)), keep_ratio=True) for r in img_ratios],
            [
                dict(type="RandomFlip", prob=0.0, direction="horizontal"),
                dict(type="RandomFlip", prob=1.0, direction="horizontal"),
            ],
            [dict(type="LoadAnnotations")],
            [dict(type="PackSegInputs")],
        ],
    ),
]
