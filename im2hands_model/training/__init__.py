"""Training stack: configuration, checkpoints, data, distributed helpers and the training loop.

Entry points:

* ``python training/train.py --config training/configs/<stage>.yaml [--set key=value ...]
  [--resume] [--out DIR]`` (the command line; also under ``torchrun --nproc_per_node=N``);
* :func:`im2hands_model.training.engine.train` (``train(cfg, resume) -> dict``) from Python, with a
  config from :func:`im2hands_model.training.config.load_config`.

The four stages (``kpts_pred``, ``kpts_ref``, ``init_occ``, ``ref_occ``) live in
:mod:`im2hands_model.training.stages` and follow the Stage protocol documented there.
"""

from im2hands_model.training.config import ConfigError, load_config
from im2hands_model.training.stages import STAGE_NAMES, load_stage, register_stage

__all__ = ["STAGE_NAMES", "ConfigError", "load_config", "load_stage", "register_stage"]
