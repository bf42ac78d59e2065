# UPerNet with Swin-T (mmseg's SwinTransformer), 512x512 crops, 160k iterations, ADE20K, on the ELSA-Swin
# recipe: the original's Swin baseline configs/swin/upernet_swin_tiny_patch4_window7_512x512_160k_ade20k.py,
# which differs from the ELSA-Swin model only in its backbone.
_base_ = "../elsa_swin/upernet_elsa-swin-t_8xb2-160k_ade20k-512x512.py"
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
        drop_path_rate=0.3,
        patch_norm=True,
        use_abs_pos_embed=False,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
    )
)
