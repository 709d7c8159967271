"""The Fast DDS profile shipped with im2hands, and how a process opts into it.

Why it exists: Fast DDS (the DDS under ``rmw_fastrtps_cpp``, ROS 2's default middleware) moves
data between processes on one machine through a shared-memory segment of 512 KiB per participant.
A VGA camera frame (640 x 480 rgb8, ~0.92 MB) does not fit, so across processes a best-effort
subscriber loses half to nearly all of the frames and a reliable one receives each frame only
after retransmissions (median ~12 ms instead of ~2 ms). ``config/fastdds.xml`` gives shared memory
an 8 MiB segment (room for several frames) and keeps UDP on the loopback interface, so no DDS
traffic leaves the machine.

Fast DDS reads the profile named by ``FASTDDS_DEFAULT_PROFILES_FILE`` when the process creates its
first DDS participant, that is at the first ``rclpy.init`` / node, and never again in that
process. So call :func:`use_shipped_profile` before ``rclpy.init``, or pass an environment
prepared with it to a child process. A profile the user chose (either variable set) always wins.

Nothing here imports ROS: the module is usable before rclpy is loaded and in launch files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

#: The variable Fast DDS 3.x reads (rmw_fastrtps additionally honours the deprecated
#: ``FASTRTPS_DEFAULT_PROFILES_FILE`` with a warning; setting both only earns that warning).
PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"
LEGACY_PROFILE_ENV = "FASTRTPS_DEFAULT_PROFILES_FILE"
PROFILE_ENV_VARS = (PROFILE_ENV, LEGACY_PROFILE_ENV)

PACKAGE = "im2hands_ros"
#: Where ``setup.py``'s ``data_files`` put the profile, relative to an install prefix.
SHARE_RELATIVE = Path("share") / PACKAGE / "config" / "fastdds.xml"
#: The profile in a source checkout, relative to the repository root.
REPO_RELATIVE = Path("config") / "fastdds.xml"


def candidate_paths(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where the profile may be, in the order :func:`profile_path` tries them: the source checkout
    this module runs from, this interpreter's prefix (``pip install`` of the package), then each
    ``AMENT_PREFIX_PATH`` entry (a colcon install or a sourced ROS workspace)."""
    env = os.environ if environ is None else environ
    paths = [
        Path(__file__).resolve().parents[1] / REPO_RELATIVE,
        Path(sys.prefix) / SHARE_RELATIVE,
    ]
    for prefix in env.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            paths.append(Path(prefix) / SHARE_RELATIVE)
    return paths


def profile_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The shipped Fast DDS profile as an absolute path, or ``None`` when it is not installed.

    ``environ`` (default ``os.environ``) supplies ``AMENT_PREFIX_PATH``.
    """
    for path in candidate_paths(environ):
        if path.is_file():
            return path.resolve()
    return None


def use_shipped_profile(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Point ``FASTDDS_DEFAULT_PROFILES_FILE`` in ``environ`` at the shipped profile.

    Returns the profile's path, or ``None`` without changing anything when the user already set
    ``FASTDDS_DEFAULT_PROFILES_FILE`` or ``FASTRTPS_DEFAULT_PROFILES_FILE`` (an empty value counts
    as unset: Fast DDS would only report that it cannot open ``""``), or when no profile is found.

    It takes effect only if it runs before the process creates its first DDS participant (before
    ``rclpy.init``); for a child process, pass a copy of ``os.environ`` and hand that to it.
    """
    if any(environ.get(name) for name in PROFILE_ENV_VARS):
        return None
    path = profile_path(environ)
    if path is None:
        return None
    environ[PROFILE_ENV] = str(path)
    return path
