"""Image classification with the ELSA-Swin models: the code behind cls/train.py, cls/validate.py and
cls/make_digits.py (timm's data, optimizers, schedulers and savers underneath)."""
