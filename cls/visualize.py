#!/usr/bin/env python3
"""Draw ELSA's attention and ghost kernels for one image: see `python visualize.py --help`."""

from elsa_cls.visualize import main

if __name__ == "__main__":
    main()
