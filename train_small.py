#!/usr/bin/env python
"""Train a small FILIP from scratch. `python train_small.py --help` lists every flag.

With no flags: the tiny preset on the built-in grounded shapes dataset, a few minutes on a laptop CPU,
then held-out retrieval printed and written to runs/<timestamp>/final.json.
"""
import sys

from minifilip.train import main

if __name__ == "__main__":
    sys.exit(main())
