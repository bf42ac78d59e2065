# Mask R-CNN (mmdet's) with the ELSA-Swin-T backbone and the recipe, 1x schedule.
_base_ = ["mmdet::_base_/models/mask-rcnn_r50_fpn.py", "./elsa_swin_recipe.py"]
model = dict(
    backbone=dict(
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
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
