"""Test-wide settings.

ROS 2 (Kilted) must keep DDS discovery on this machine and each test run needs its own domain, so
that parallel runs (and any robot on the network) never see each other. `make test` sets both;
these defaults cover a plain `pytest` too. They must be set before anything imports rclpy.
"""

import os

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
# Fast DDS on Linux accepts domain ids 0..101 (port arithmetic); stay within 1..90.
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 90 + 1))

# The nodes load the shipped Fast DDS profile (config/fastdds.xml: a shared-memory segment that
# holds VGA frames) unless the user chose one; test processes and their children do the same.
from im2hands_ros.fastdds import use_shipped_profile  # noqa: E402

use_shipped_profile()

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

#: The tiny dataset every training test shares: made once per test session by the real command.
TINY_SCENES = 16
TINY_POINTS = 2048
TINY_IMAGE = 128


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """16 synthetic scenes (2,048 points per hand, 128 px crops) in shards of 8."""
    out = tmp_path_factory.mktemp("tiny") / "ds"
    cmd = [sys.executable, "-m", "im2hands_model.data.cli", "synth", "--n", str(TINY_SCENES),
           "--seed", "7", "--out", str(out), "--workers", "2", "--points-per-hand",
           str(TINY_POINTS), "--image-size", str(TINY_IMAGE), "--shard-size", "8", "--quiet",
           "--no-contact-sheet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
