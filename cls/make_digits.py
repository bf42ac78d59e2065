#!/usr/bin/env python3
"""Write scikit-learn's digits as an ImageFolder dataset: see `python make_digits.py --help`."""

from elsa_cls.digits import main

if __name__ == "__main__":
    main()
