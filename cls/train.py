#!/usr/bin/env python3
"""Train an ELSA-Swin (or any timm model) on an ImageFolder dataset: see `python train.py --help`."""

from elsa_cls.train import main

if __name__ == "__main__":
    main()
