# UPerNet with ELSA-Swin-S, 512x512 crops, 160k iterations, ADE20K; the tiny config's recipe.
_base_ = "./upernet_elsa-swin-t_8xb2-160k_ade20k-512x512.py"
model = dict(
    backbone=dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], group_width=8),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
