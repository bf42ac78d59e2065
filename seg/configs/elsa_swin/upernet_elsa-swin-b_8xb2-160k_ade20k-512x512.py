# UPerNet with ELSA-Swin-B, 512x512 crops, 160k iterations, ADE20K; the tiny config's recipe.
_base_ = "./upernet_elsa-swin-t_8xb2-160k_ade20k-512x512.py"
model = dict(
    backbone=dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], group_width=8),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512),
)
