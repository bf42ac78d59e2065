# The original ELSA-Swin detection recipe (from Swin's): multi-scale 480-800 training with the DETR crop
# policy, AdamW lr 1e-4 / wd 0.05 without decay on norms and position tables, mixed precision.
# Its names are prefixed elsa_ because mmengine forbids keys shared by two bases; the detector bases
# below place them with {{_base_.elsa_...}}.
custom_imports = dict(imports=["elsa_mm"], allow_failed_imports=False)
# Checkpoints that torch.load(weights_only=True) reads, with mmdet's own tools too.
custom_hooks = [dict(type="SafeCheckpointHook")]

elsa_backbone = dict(
    _delete_=True,
    type="ELSASwin",
    embed_dim=96,
    depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24],
    window_size=7,
    group_width=4,
    drop_path_rate=0.2,
    use_checkpoint=False,
    out_indices=(0, 1, 2, 3),
)
elsa_neck_channels = [96, 192, 384, 768]

multi_scales = [
    (480, 1333),
    (512, 1333),
    (544, 1333),
    (576, 1333),
    (608, 1333),
    (640, 1333),
    (672, 1333),
    (704, 1333),
    (736, 1333),
    (768, 1333),
    (800, 1333),
]
elsa_train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="RandomChoice",
        transforms=[
            [dict(type="RandomChoiceResize", scales=multi_scales, keep_ratio=True)],
            [
                dict(type="RandomChoiceResize", scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
                dict(type="RandomCrop", crop_type="absolute_range", crop_size=(384, 600), allow_negative_crop=True),
                dict(type="RandomChoiceResize", scales=multi_scales, keep_ratio=True),
            ],
        ],
    ),
    dict(type="PackDetInputs"),
]
elsa_optim_wrapper = dict(
    _delete_=True,
    type="AmpOptimWrapper",
    optimizer=dict(type="AdamW", lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            "absolute_pos_embed": dict(decay_mult=0.0),
            "relative_position_bias_table": dict(decay_mult=0.0),
            "norm": dict(decay_mult=0.0),
        }
    ),
)

# The original's warm-up (mmdet 2's schedule_1x.py: linear, 500 iterations, ratio 0.001): at iteration t < 500
# the learning rate is 0.001 + 0.999 * t / 500 of its value, and whole from iteration 500 on. mmengine's
# LinearLR reaches its end factor at iteration end - 1, hence end=501. Then x0.1 at epochs 8, 11 (1x) or
# 27, 33 (3x).
elsa_warmup = dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=501)
elsa_schedule_1x = [
    elsa_warmup,
    dict(type="MultiStepLR", begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
elsa_schedule_3x = [
    elsa_warmup,
    dict(type="MultiStepLR", begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
