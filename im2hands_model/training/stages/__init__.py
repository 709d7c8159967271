"""Training stages and their registry.

A stage is a class that knows how to build one network, compute its loss on a batch, validate it and
draw a picture of its output; the engine (:mod:`im2hands_model.training.engine`) does everything
else (optimiser, schedule, AMP, DDP, checkpoints, logging). The config's ``stage:`` key selects it:

* one of the built-in names ``kpts_pred``, ``kpts_ref``, ``init_occ``, ``ref_occ``: the class in
  ``im2hands_model/training/stages/<name>.py`` whose attribute ``name`` equals ``<name>``;
* a name given to :func:`register_stage` in this process (tests, notebooks);
* ``package.module:ClassName`` or ``path/to/file.py:ClassName`` for a stage outside the package
  (also works across processes, e.g. under ``torchrun``).

Stage protocol::

    class Stage:
        name: str           # "kpts_pred" | "kpts_ref" | "init_occ" | "ref_occ" | your own
        best_metric: str    # key of validate()'s dict that selects best.pt, e.g. "iou"
        best_mode: str      # "max" or "min"
        def __init__(self, cfg: dict) -> None                  # the full resolved config
        def build_model(self, device: torch.device) -> nn.Module
        def loss(self, model, batch: dict[str, Tensor], gen: torch.Generator)
            -> tuple[Tensor, dict[str, float]]                 # scalar loss, named float terms
        @torch.no_grad()
        def validate(self, model, batch) -> dict[str, float]   # batch means of metrics
        @torch.no_grad()
        def visualize(self, model, batch) -> np.ndarray | None # [H, W, 3] uint8
        data_keys: tuple[str, ...] | None   # optional: only load these dataset keys
        optional_data_keys: tuple[str, ...] # optional: and these, where every folder has them

``gen`` is a CPU ``torch.Generator`` seeded by the engine from ``(seed, step, rank)``; it must be
the loss's only source of randomness so that a resumed run repeats the uninterrupted one. Draw
with ``generator=gen, device=gen.device`` and move the result to the batch's device (the same
numbers on a CPU or a GPU run).
``loss`` receives the model as the engine wraps it (``DistributedDataParallel`` when
``WORLD_SIZE > 1``): call it as ``model(...)``. ``validate`` and ``visualize`` receive the
unwrapped module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from im2hands_model.training.config import ConfigError

#: The built-in stages, in training order.
STAGE_NAMES: tuple[str, ...] = ("kpts_pred", "kpts_ref", "init_occ", "ref_occ")

_REGISTRY: dict[str, type] = {}
_REQUIRED_METHODS = ("build_model", "loss", "validate", "visualize")


def register_stage(cls: type, name: str | None = None) -> type:
    """Make ``cls`` selectable as ``stage: <name>`` in this process (default: ``cls.name``).

    Usable as a class decorator. Registered names take precedence over the built-in ones.
    """
    key = name if name is not None else getattr(cls, "name", None)
    if not isinstance(key, str) or not key:
        raise ValueError(f"register_stage: {cls!r} has no string attribute 'name'; pass name=")
    check_stage_class(cls, key)
    _REGISTRY[key] = cls
    return cls


def unregister_stage(name: str) -> None:
    """Forget a stage given to :func:`register_stage` (no error if it is unknown)."""
    _REGISTRY.pop(name, None)


def is_known_stage(name: object) -> bool:
    """Whether ``name`` selects a stage without importing anything (built-in, registered, path)."""
    return isinstance(name, str) and (name in STAGE_NAMES or name in _REGISTRY or ":" in name)


def check_stage_class(cls: object, name: str) -> None:
    """Raise ``TypeError`` unless ``cls`` is a class following the Stage protocol."""
    if not isinstance(cls, type):
        raise TypeError(f"stage {name!r}: {cls!r} is not a class")
    missing = [m for m in _REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    for attr in ("name", "best_metric", "best_mode"):
        if not isinstance(getattr(cls, attr, None), str):
            missing.append(f"{attr} (str)")
    if missing:
        raise TypeError(
            f"stage {name!r}: class {cls.__qualname__} does not follow the Stage protocol; "
            f"missing {', '.join(missing)} (see im2hands_model.training.stages)"
        )
    if cls.best_mode not in ("max", "min"):
        raise TypeError(f"stage {name!r}: best_mode must be 'max' or 'min', not {cls.best_mode!r}")


def _unknown(name: object) -> ConfigError:
    extra = f"; registered here: {', '.join(sorted(_REGISTRY))}" if _REGISTRY else ""
    return ConfigError(
        f"unknown stage {name!r}: choose one of {', '.join(STAGE_NAMES)}{extra} "
        "(or 'package.module:ClassName' / 'path/to/file.py:ClassName' for a custom stage)"
    )


def _import_module_from_file(path: Path):
    """Import a Python file as a module (cached by its absolute path)."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"stage file {path} does not exist")
    mod_name = "_im2hands_stage_" + "_".join(path.with_suffix("").parts[-3:]).replace("-", "_")
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import stage file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module


def _load_path(spec: str) -> type:
    target, _, cls_name = spec.rpartition(":")
    if not target or not cls_name:
        raise _unknown(spec)
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_module_from_file(Path(target))
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"stage {spec!r}: cannot import module {target!r} ({exc})") from exc
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ConfigError(f"stage {spec!r}: module {target!r} has no attribute {cls_name!r}")
    check_stage_class(cls, spec)
    return cls


def load_stage(name: str) -> type:
    """The Stage class that ``stage: <name>`` selects (imported lazily).

    Raises:
        ConfigError: unknown name (the message lists the built-in stages), or a module that does
            not define a stage class with ``name == <name>``.
        TypeError: the class does not follow the Stage protocol.
    """
    if not isinstance(name, str):
        raise _unknown(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _load_path(name)
    if name not in STAGE_NAMES:
        raise _unknown(name)
    module = importlib.import_module(f"{__name__}.{name}")
    candidates = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and getattr(obj, "name", None) == name
        and obj.__module__ == module.__name__
    ]
    if len(candidates) != 1:
        found = "no class" if not candidates else f"{len(candidates)} classes"
        raise ConfigError(
            f"module {module.__name__} defines {found} with attribute name == {name!r}; "
            "it must define exactly one Stage class"
        )
    check_stage_class(candidates[0], name)
    return candidates[0]
