#!/usr/bin/env python3
"""Evaluate a checkpoint on an ImageFolder split: see `python validate.py --help`."""

from elsa_cls.validate import main

if __name__ == "__main__":
    main()
