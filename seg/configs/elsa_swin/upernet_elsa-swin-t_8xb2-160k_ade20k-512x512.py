# UPerNet with ELSA-Swin-T, 512x512 crops, 160k iterations, ADE20K (150 classes). The recipe is
# Swin's (mmseg's config this inherits): AdamW lr 6e-5 / wd 0.01 without decay on norms and position
# tables, poly schedule after 1500 linear warm-up iterations, 2 images per GPU, FCN auxiliary head on stage 3.
_base_ = "mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py"
custom_imports = dict(imports=["elsa_mm"], allow_failed_imports=False)
# Checkpoints that torch.load(weights_only=True) reads, with mmseg's own tools too.
custom_hooks = [dict(type="SafeCheckpointHook")]
model = dict(
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
