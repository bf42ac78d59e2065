# Cascade Mask R-CNN with Swin-T (mmdet's SwinTransformer) and the ELSA-Swin recipe, 1x schedule: the original's
# Swin baseline (Swin's cascade heads), which differs from the ELSA-Swin model only in its backbone.
_base_ = "./cascade-mask-rcnn_elsa-swin-t_fpn_ms-crop-1x.py"
model = dict(
    backbone=dict(
        _delete_=True,
        type="SwinTransformer",
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        convert_weights=True,
    )
)
