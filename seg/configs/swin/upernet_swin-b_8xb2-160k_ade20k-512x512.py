# UPerNet with Swin-B (mmseg's SwinTransformer), 512x512 crops, 160k iterations, ADE20K, on the ELSA-Swin
# recipe: the original's Swin baseline configs/swin/upernet_swin_base_patch4_window7_512x512_160k_ade20k.py.
_base_ = "./upernet_swin-t_8xb2-160k_ade20k-512x512.py"
model = dict(
    backbone=dict(embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512),
)
