# UPerNet with ELSA-Swin-B, 512x512 crops, 160k iterations, ADE20K (150 classes). The recipe is
# Swin's (mmseg's config this inherits): AdamW lr 6e-5 / wd 0.01 without decay on norms and position
# tables, poly schedule after 1500 linear warm-up iterations, 2 images per GPU, FCN auxiliary head on stage 3.
_base_ = 'mmseg::swin/swin-base-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
custom_imports = dict(imports=['elsa_seg'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type='ELSASwin',
        embed_dim=128,
        depths=[2, 2, 18, 2],
        num_heads=[4, 8, 16, 32],
        window_size=7,
        group_width=8,
        drop_path_rate=0.3,
        use_checkpoint=False,
        out_indices=(0, 1, 2, 3)),
    decode_head=dict(in_channels=[128, 256, 512, 1024], num_classes=150),
    auxiliary_head=dict(in_channels=512, num_classes=150))
