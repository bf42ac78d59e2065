#!/usr/bin/env python3
"""Train a segmentor: python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]]
[--cfg-options model.pretrained=<classification checkpoint> model.backbone.use_checkpoint=True]"""

from elsa_mm.tools import load_config, train, train_parser

if __name__ == "__main__":
    args = train_parser().parse_args()
    train(load_config(args), args)
