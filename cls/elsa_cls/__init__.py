"""Image classification with the ELSA-Swin models: the code behind cls/train.py, validate.py, predict.py,
visualize.py and make_digits.py (timm's data, optimizers, schedulers and savers underneath). Each tool's
``main(argv=None)`` takes its command line as a list and stops on bad input with a one-line
``SystemExit("error: ...")``."""
