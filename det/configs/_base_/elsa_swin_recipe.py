# The original ELSA-Swin detection recipe (from Swin's) on mmdet's COCO instance data, 1x schedule and
# runtime: multi-scale 480-800 training with the DETR crop policy, AdamW lr 1e-4 / wd 0.05 without decay on
# norms and position tables, mixed precision. The detector bases beside it add the model.
_base_ = [
    "mmdet::_base_/datasets/coco_instance.py",
    "mmdet::_base_/schedules/schedule_1x.py",
    "mmdet::_base_/default_runtime.py",
]
custom_imports = dict(imports=["elsa_mm"], allow_failed_imports=False)
# Checkpoints that torch.load(weights_only=True) reads, with mmdet's own tools too; validation after each
# epoch in mixed precision when training is, as the original's (apex O1 patched all of torch).
custom_hooks = [dict(type="SafeCheckpointHook"), dict(type="AmpValidationHook")]

# Flip, then either a resize to a short side in 480, 512, ..., 800, or a resize to 400/500/600, a random crop
# of 384-600 and a resize to 480-800 (long side at most 1333, aspect ratio kept).
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="RandomChoice",
        transforms=[
            [dict(type="RandomChoiceResize", scales=[(s, 1333) for s in range(480, 801, 32)], keep_ratio=True)],
            [
                dict(type="RandomChoiceResize", scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
                dict(type="RandomCrop", crop_type="absolute_range", crop_size=(384, 600), allow_negative_crop=True),
                dict(type="RandomChoiceResize", scales=[(s, 1333) for s in range(480, 801, 32)], keep_ratio=True),
            ],
        ],
    ),
    dict(type="PackDetInputs"),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
optim_wrapper = dict(
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
# LinearLR reaches its end factor at iteration end - 1, hence end=501. Then x0.1 at epochs 8 and 11 (the 3x
# configs: 27 and 33).
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=501),
    dict(type="MultiStepLR", begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
# The published models were trained with 16 images per step (8 GPUs x 2): on fewer GPUs, --auto-scale-lr
# scales the learning rate by (GPUs x 2) / 16.
auto_scale_lr = dict(enable=False, base_batch_size=16)
