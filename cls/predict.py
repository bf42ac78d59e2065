#!/usr/bin/env python3
"""Top-5 classes of images with a trained ELSA-Swin: see `python predict.py --help`."""

from elsa_cls.predict import main

if __name__ == "__main__":
    main()
