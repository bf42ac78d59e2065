#!/usr/bin/env python3
"""Train a segmentor: python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]]
[--cfg-options model.pretrained=<classification checkpoint> model.backbone.use_checkpoint=True]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from elsa_mm.tools import add_plugin_path, load_config, train, train_parser  # noqa: E402

if __name__ == "__main__":
    add_plugin_path(__file__)
    args = train_parser().parse_args()
    train(load_config(args), args)
