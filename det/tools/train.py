#!/usr/bin/env python3
"""Train a detector: python tools/train.py CONFIG [--work-dir DIR] [--amp] [--auto-scale-lr] [--resume [CKPT]]
[--cfg-options model.pretrained=<classification checkpoint> model.backbone.use_checkpoint=True]"""

from collections.abc import Sequence

from elsa_mm.tools import load_config, train, train_parser


def main(argv: Sequence[str] | None = None) -> None:
    args = train_parser().parse_args(argv)
    train(load_config(args), args)


if __name__ == "__main__":
    main()
