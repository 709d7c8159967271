"""Package trained runs as the shipped weights: ``python training/export_weights.py --help``.

See :mod:`im2hands_model.training.export`.
"""

import sys

from im2hands_model.training.export import main

if __name__ == "__main__":
    sys.exit(main())
