"""Evaluate checkpoints: ``python training/evaluate.py --checkpoint RUN/best.pt --data DIR``.

See :mod:`im2hands_model.training.evaluate` for the variants and outputs.
"""

import sys

from im2hands_model.training.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
