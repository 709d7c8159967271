"""Training configuration: YAML files, ``key.sub=value`` overrides, defaults and validation.

A config is a plain nested ``dict`` (what ``yaml.safe_load`` returns). :func:`load_config` reads a
YAML file (``yaml.safe_load`` only), lays it over :data:`DEFAULTS`, applies the overrides and
validates the result; the engine saves the resolved config as ``<out>/config.yaml`` next to the
checkpoints (:func:`save_config`).

Keys (defaults in :data:`DEFAULTS`; ``train`` and ``train.scheduler`` are checked strictly, the
other sections may carry stage-specific keys)::

    stage: init_occ            # kpts_pred | kpts_ref | init_occ | ref_occ | package.module:Class
    seed: 0
    out: runs/init_occ         # run folder (default runs/<stage>)
    data:
      dataset: synthetic       # synthetic: any shard folder (im2hands-data synth or interhand)
                               # interhand: folders written by `im2hands-data interhand` only
      train: out/bench/train
      val: out/bench/val
      num_workers: 2           # DataLoader worker processes per rank (0 = load in the main process)
      points_per_hand: 2048    # read by the occupancy stages
    model: {...}               # stage-specific network sizes
    loss: {...}                # stage-specific loss weights / noise
    init: {...}                # e.g. ref_occ: {init_occ_checkpoint: runs/init_occ/best.pt}
    train:
      device: auto             # auto (cuda if available) | cpu | cuda
      batch_size: 8            # per process (the global batch is batch_size x WORLD_SIZE)
      val_batch_size: null     # default: batch_size
      optimizer: adam          # adam | adamw
      lr: 1.0e-4
      weight_decay: 0.0
      betas: [0.9, 0.999]
      max_steps: 2000
      time_limit_min: null     # stop after this many minutes (validation + checkpoint first)
      scheduler: {type: cosine, warmup_steps: 0, min_lr_ratio: 0.0, step_size: 1000, gamma: 0.5}
      grad_clip: 1.0           # max gradient norm (null: no clipping)
      amp: true                # mixed precision, CUDA only (bf16 if supported, else fp16+scaler)
      log_every: 10            # train_log.jsonl / TensorBoard / progress-bar interval (steps)
      val_every: 200
      val_batches: 8           # validation batches per rank
      ckpt_every: 100          # last.pt interval (steps); also written at the end
      max_consecutive_nonfinite: 20  # abort after this many non-finite losses in a row
      find_unused_parameters: false  # DDP option, for stages that leave parameters unused
      progress: true           # tqdm bar on rank 0
      tensorboard: true        # SummaryWriter in <out>/tb on rank 0
      debug_rank_state: false  # each rank writes <out>/debug/rank<R>.json with a weight digest

Overrides are ``dotted.key=value`` strings; the value is parsed with ``yaml.safe_load`` (numbers,
``true``/``false``, ``null``, ``[lists]``, ``{maps}``); ``1e-4`` is read as a float too.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

#: Config file written into the run folder.
CONFIG_FILE = "config.yaml"

INTERHAND_HINT = (
    "make one with `im2hands-data interhand --root IH26M --mano MANO_NPZ --split train --out DIR` "
    "(see training/README.md, InterHand2.6M)"
)

DEFAULTS: dict[str, Any] = {
    "stage": None,
    "seed": 0,
    "out": None,
    "data": {
        "dataset": "synthetic",
        "train": None,
        "val": None,
        "num_workers": 2,
        "points_per_hand": 2048,
        # photometric augmentation of the crops (image stages): brightness/contrast/colour
        # jitter of this relative size, and Gaussian pixel noise of this standard deviation;
        # geometric (kpts_pred only): mirror probability, largest in-plane rotation in degrees
        "augment": {"colour": 0.0, "noise": 0.0, "mirror": 0.0, "rotate": 0.0},
    },
    "model": {},
    "loss": {},
    "init": {},
    "train": {
        "device": "auto",
        "batch_size": 8,
        "val_batch_size": None,
        "optimizer": "adam",
        "lr": 1.0e-4,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "max_steps": 2000,
        "time_limit_min": None,
        "scheduler": {
            "type": "cosine",
            "warmup_steps": 0,
            "min_lr_ratio": 0.0,
            "step_size": 1000,
            "gamma": 0.5,
        },
        "grad_clip": 1.0,
        "amp": True,
        "log_every": 10,
        "val_every": 200,
        "val_batches": 8,
        "ckpt_every": 100,
        "max_consecutive_nonfinite": 20,
        "find_unused_parameters": False,
        "progress": True,
        "tensorboard": True,
        "debug_rank_state": False,
        # warm start: model weights from this checkpoint (a run's best.pt/last.pt or
        # model.safetensors); optimiser, schedule and step start afresh. Ignored on --resume.
        "init_weights": None,
    },
}

SCHEDULERS = ("cosine", "step", "constant")
OPTIMIZERS = ("adam", "adamw")
DATASETS = ("synthetic", "interhand")
DEVICES = ("auto", "cpu", "cuda")

_KEY_RE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A config file, an override or a config value is not usable (the message says why)."""


def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: ``base`` with ``update`` laid over it, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def plain(obj: Any) -> Any:
    """``obj`` with paths as strings and tuples as lists (what YAML and checkpoints can hold)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def parse_value(text: str) -> Any:
    """An override's value: ``yaml.safe_load`` of ``text``, with ``1e-4``-style floats as floats."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {text!r}: {exc}") from exc
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> ``(["train", "lr"], 0.0003)``.

    Raises:
        ConfigError: no ``=``, an empty or malformed key, or an unparsable value.
    """
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(
            f"bad override {item!r}: expected key.sub=value (e.g. train.batch_size=4)"
        )
    key, _, text = item.partition("=")
    key = key.strip()
    if not _KEY_RE.match(key):
        raise ConfigError(
            f"bad override {item!r}: the key must be dotted names like train.lr (got {key!r})"
        )
    return key.split("."), parse_value(text)


def apply_overrides(cfg: dict, overrides: list[str] | None) -> dict:
    """A new config with each ``key.sub=value`` override set (intermediate dicts are created)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        path, value = parse_override(item)
        node = cfg
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"bad override {item!r}: {where} is {child!r}, not a section")
            node = child
        leaf = path[-1]
        if isinstance(node.get(leaf), dict) and isinstance(value, dict):
            node[leaf] = deep_merge(node[leaf], value)
        else:
            node[leaf] = value
    return cfg


def read_yaml(path: str | os.PathLike) -> dict:
    """``yaml.safe_load`` of a config file; it must hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    return data


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    out: str | os.PathLike | None = None,
    base: dict | None = None,
    check_paths: bool = True,
) -> dict:
    """The resolved, validated config: :data:`DEFAULTS` <- YAML file (or ``base``) <- overrides.

    Args:
        path: YAML file (``yaml.safe_load``); optional when ``base`` is given.
        overrides: ``key.sub=value`` strings, applied in order.
        out: run folder; replaces ``out`` (the CLI's ``--out``).
        base: a config dict used instead of (or laid over) the file.
        check_paths: check that the dataset folders exist.

    Raises:
        ConfigError: listing every problem found.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = deep_merge(cfg, read_yaml(path))
    if base is not None:
        cfg = deep_merge(cfg, plain(base))
    cfg = apply_overrides(cfg, overrides)
    if out is not None:
        cfg["out"] = str(out)
    if cfg.get("out") is None and isinstance(cfg.get("stage"), str):
        cfg["out"] = str(Path("runs") / cfg["stage"].rpartition(":")[2])
    validate_config(cfg, check_paths=check_paths)
    return cfg


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def is_interhand_dataset(folder: str | os.PathLike) -> bool:
    """Whether a shard folder was written by ``im2hands-data interhand``."""
    try:
        index = json.loads((Path(folder) / "index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and "interhand" in index


def _check_dataset_dir(
    errors: list[str], key: str, value: Any, check_paths: bool, interhand: bool = False
) -> None:
    if isinstance(value, list | tuple) and value:  # several folders, read as one dataset
        for i, item in enumerate(value):
            _check_dataset_dir(errors, f"{key}[{i}]", item, check_paths, interhand)
        return
    if not isinstance(value, str | os.PathLike) or not str(value):
        errors.append(f"{key} is missing: set it to a dataset folder (e.g. --set {key}=DIR)")
    elif check_paths and not (Path(value) / "index.json").is_file():
        what = "does not exist" if not Path(value).exists() else "is not a dataset (no index.json)"
        make = INTERHAND_HINT if interhand else (
            f"make one with `im2hands-data synth --n 2000 --seed 0 --out {value}`")  # fmt: skip
        errors.append(f"{key}: {value} {what}; {make}")
    elif check_paths and interhand and not is_interhand_dataset(value):
        errors.append(
            f"{key}: {value} is not an InterHand2.6M conversion (data.dataset=interhand); "
            f"{INTERHAND_HINT}, or use data.dataset=synthetic"
        )


def validate_config(cfg: dict, check_paths: bool = True) -> None:
    """Raise :class:`ConfigError` listing every invalid or missing value of ``cfg``."""
    from im2hands_model.training.stages import STAGE_NAMES, is_known_stage

    errors: list[str] = []
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config is a mapping, not {type(cfg).__name__}")

    stage = cfg.get("stage")
    if stage is None:
        errors.append(f"stage is missing: set stage to one of {', '.join(STAGE_NAMES)}")
    elif not is_known_stage(stage):
        errors.append(
            f"unknown stage {stage!r}: choose one of {', '.join(STAGE_NAMES)} "
            "(or 'package.module:ClassName' for a custom stage)"
        )
    if not _is_int(cfg.get("seed")) or cfg["seed"] < 0:
        errors.append(f"seed must be an integer >= 0, not {cfg.get('seed')!r}")
    if not isinstance(cfg.get("out"), str) or not cfg["out"]:
        errors.append(f"out must be a folder name, not {cfg.get('out')!r}")
    for section in ("data", "model", "loss", "init", "train"):
        if not isinstance(cfg.get(section), dict):
            errors.append(f"{section} must be a section (mapping), not {cfg.get(section)!r}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))

    data = cfg["data"]
    if data.get("dataset") not in DATASETS:
        errors.append(
            f"data.dataset must be one of {', '.join(DATASETS)}, not {data.get('dataset')!r}"
        )
    else:
        interhand = data["dataset"] == "interhand"
        _check_dataset_dir(errors, "data.train", data.get("train"), check_paths, interhand)
        _check_dataset_dir(errors, "data.val", data.get("val"), check_paths, interhand)
    if not _is_int(data.get("num_workers")) or data["num_workers"] < 0:
        errors.append(f"data.num_workers must be an integer >= 0, not {data.get('num_workers')!r}")
    ppp = data.get("points_per_hand")
    if ppp is not None and (not _is_int(ppp) or ppp <= 0):
        errors.append(f"data.points_per_hand must be a positive integer, not {ppp!r}")
    aug = data.get("augment")
    if not isinstance(aug, dict):
        errors.append(f"data.augment must be a mapping ({', '.join(DEFAULTS['data']['augment'])})"
                      f", not {aug!r}")  # fmt: skip
    else:
        known_a = list(DEFAULTS["data"]["augment"])
        for key, value in aug.items():
            top = 180 if key == "rotate" else 1  # rotate is in degrees
            if key not in known_a:
                errors.append(f"unknown key data.augment.{key}{_suggest(key, known_a)}")
            elif not _is_num(value) or not 0 <= value <= top:
                errors.append(f"data.augment.{key} must be a number in [0, {top}], not {value!r}")

    train = cfg["train"]
    known = list(DEFAULTS["train"])
    for key in train:
        if key not in known:
            errors.append(f"unknown key train.{key}{_suggest(key, known)}")

    def positive_int(key: str) -> None:
        v = train.get(key)
        if not _is_int(v) or v <= 0:
            errors.append(f"train.{key} must be a positive integer, not {v!r}")

    for key in ("batch_size", "max_steps", "log_every", "val_every", "val_batches",
                "ckpt_every", "max_consecutive_nonfinite"):  # fmt: skip
        positive_int(key)
    if train.get("val_batch_size") is not None:
        positive_int("val_batch_size")
    lr = train.get("lr")
    if not _is_num(lr) or lr <= 0:
        errors.append(f"train.lr must be a positive number, not {lr!r}")
    wd = train.get("weight_decay")
    if not _is_num(wd) or wd < 0:
        errors.append(f"train.weight_decay must be a number >= 0, not {wd!r}")
    betas = train.get("betas")
    if (not isinstance(betas, list | tuple) or len(betas) != 2
            or not all(_is_num(b) and 0 <= b < 1 for b in betas)):  # fmt: skip
        errors.append(f"train.betas must be two numbers in [0, 1), not {betas!r}")
    if train.get("optimizer") not in OPTIMIZERS:
        errors.append(
            f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, not "
            f"{train.get('optimizer')!r}"
        )
    if train.get("device") not in DEVICES:
        errors.append(
            f"train.device must be one of {', '.join(DEVICES)}, not {train.get('device')!r}"
        )
    tl = train.get("time_limit_min")
    if tl is not None and (not _is_num(tl) or tl <= 0):
        errors.append(f"train.time_limit_min must be a positive number or null, not {tl!r}")
    iw = train.get("init_weights")
    if iw is not None:
        if not isinstance(iw, str | os.PathLike) or not str(iw):
            errors.append(f"train.init_weights must be a checkpoint path or null, not {iw!r}")
        elif check_paths and not Path(iw).is_file():
            errors.append(f"train.init_weights: {iw} does not exist")
    gc = train.get("grad_clip")
    if gc is not None and (not _is_num(gc) or gc <= 0):
        errors.append(f"train.grad_clip must be a positive number or null, not {gc!r}")
    for key in ("amp", "find_unused_parameters", "progress", "tensorboard", "debug_rank_state"):
        if not isinstance(train.get(key), bool):
            errors.append(f"train.{key} must be true or false, not {train.get(key)!r}")

    sched = train.get("scheduler")
    if not isinstance(sched, dict):
        errors.append(f"train.scheduler must be a section, not {sched!r}")
    else:
        known_s = list(DEFAULTS["train"]["scheduler"])
        for key in sched:
            if key not in known_s:
                errors.append(f"unknown key train.scheduler.{key}{_suggest(key, known_s)}")
        if sched.get("type") not in SCHEDULERS:
            errors.append(
                f"train.scheduler.type must be one of {', '.join(SCHEDULERS)}, not "
                f"{sched.get('type')!r}"
            )
        ws = sched.get("warmup_steps")
        if not _is_int(ws) or ws < 0:
            errors.append(f"train.scheduler.warmup_steps must be an integer >= 0, not {ws!r}")
        mr = sched.get("min_lr_ratio")
        if not _is_num(mr) or not 0 <= mr <= 1:
            errors.append(f"train.scheduler.min_lr_ratio must be in [0, 1], not {mr!r}")
        ss = sched.get("step_size")
        if not _is_int(ss) or ss <= 0:
            errors.append(f"train.scheduler.step_size must be a positive integer, not {ss!r}")
        gm = sched.get("gamma")
        if not _is_num(gm) or gm <= 0:
            errors.append(f"train.scheduler.gamma must be a positive number, not {gm!r}")

    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def save_config(cfg: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``cfg`` as ``<out_dir>/config.yaml`` (atomically). Returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CONFIG_FILE
    tmp = out_dir / f".{CONFIG_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False, default_flow_style=None)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
