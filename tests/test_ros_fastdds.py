"""The shipped Fast DDS profile (``config/fastdds.xml``) with real processes: VGA camera frames
from a publisher process (``tests/ros_image_blaster.py``) to a subscriber in this process.

Without the profile, Fast DDS's 512 KiB shared-memory segment is smaller than one 640 x 480 rgb8
frame (0.92 MB): best effort loses half to nearly all of the frames between processes (how many
depends on timing, so it is printed, not asserted) and reliable delivery needs retransmissions
(median ~12 ms a frame at 30 Hz on the 2-core development machine, against ~2 ms with the
profile). ``test_latency_with_and_without_profile`` prints the numbers (``pytest -s`` shows them).

Fast DDS reads its profile once per process, when the process creates its first participant: the
module's listener is created with the profile set (so both ends use it when this file runs on its
own), and each publisher process gets the profile or not through its environment. What decides
whether frames fit is the publisher's segment (the writer puts each sample into its own segment),
so the with/without comparison holds even when an earlier test module in the same pytest process
already created a participant without the profile.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

from ros_helpers import Listener, spawn, stop  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from im2hands_ros import fastdds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLASTER = Path(__file__).with_name("ros_image_blaster.py")
FRAMES = 60
RATE_HZ = 30.0
MIN_FRACTION = 0.95
VGA_RGB8_BYTES = 640 * 480 * 3
NS = "{http://www.eprosima.com}"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FASTDDS_ERROR = re.compile(r"\[\w+ Error\]")


def fastdds_errors(log_text: str) -> list[str]:
    """The lines of a process log in which Fast DDS reports an error, e.g.
    ``[XMLPARSER Error] Invalid element found into 'transportDescriptorType'`` (Fast DDS prints
    them, colour-coded, on stderr and carries on with its defaults)."""
    plain = _ANSI.sub("", log_text)
    return [ln for ln in plain.splitlines() if "XMLPARSER" in ln or _FASTDDS_ERROR.search(ln)]


@dataclass
class Run:
    """One publisher process's frames as seen by the listener."""

    label: str
    published: int
    received: int
    latencies_ms: list[float]
    log: Path

    @property
    def fraction(self) -> float:
        return self.received / self.published if self.published else 0.0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else math.nan

    def line(self) -> str:
        return (
            f"{self.label:<22} {self.received:3d}/{self.published} received "
            f"({100 * self.fraction:5.1f} %), latency median {self.median_ms:6.2f} ms"
        )


def _child_env(profile: bool) -> dict[str, str]:
    """The publisher's environment: the shipped profile, or none at all (Fast DDS defaults)."""
    env = {k: v for k, v in os.environ.items() if k not in fastdds.PROFILE_ENV_VARS}
    if profile:
        assert fastdds.use_shipped_profile(env) is not None
    return env


def _blast(listener: Listener, log: Path, *, profile: bool, reliability: str) -> Run:
    """Publish FRAMES VGA frames at RATE_HZ from a new process to a new subscription."""
    topic = f"/im2hands_test/vga_{uuid.uuid4().hex[:8]}"
    got = listener.listen(topic, Image, reliable=reliability == "reliable", depth=10)
    cmd = [sys.executable, str(BLASTER), "--count", str(FRAMES), "--rate", str(RATE_HZ),
           "--reliability", reliability, "--topic", topic, "--linger", "0.5"]  # fmt: skip
    proc = spawn(cmd, log, env=_child_env(profile))
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        stop(proc)
        tail = log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"publisher did not finish\n{tail}") from None
    text = log.read_text(errors="replace")
    done = re.search(r"published (\d+) frames", text)
    assert proc.returncode == 0 and done, f"publisher failed (rc {proc.returncode})\n{text[-3000:]}"
    time.sleep(0.3)  # the last frames' callbacks
    frames = list(got)
    got.clear()  # ~55 MB of pixels
    stamps: dict[int, int] = {}
    for recv_ns, msg in frames:
        stamps.setdefault(msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec, recv_ns)
    latencies = [(recv - stamp) / 1e6 for stamp, recv in stamps.items()]
    label = f"{'profile' if profile else 'default'} {reliability}"
    return Run(label, int(done.group(1)), len(stamps), latencies, log)


@pytest.fixture(scope="module")
def listener():
    """A listener whose participant uses the shipped profile: the variable is set (only) while
    the participant is created, so later child processes choose for themselves."""
    env = {k: v for k, v in os.environ.items() if k not in fastdds.PROFILE_ENV_VARS}
    assert fastdds.use_shipped_profile(env) is not None
    with pytest.MonkeyPatch.context() as mp:
        for name in fastdds.PROFILE_ENV_VARS:
            mp.delenv(name, raising=False)
        mp.setenv(fastdds.PROFILE_ENV, env[fastdds.PROFILE_ENV])
        node = Listener("fastdds_profile_listener")
    try:
        yield node
    finally:
        node.close()


@pytest.fixture(autouse=True)
def _no_user_profile(monkeypatch) -> None:
    """Children get exactly the profile a test picks, whatever this shell exported."""
    for name in fastdds.PROFILE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def profile_run(listener, tmp_path_factory) -> Run:
    """Best effort at 30 Hz with the shipped profile in both processes."""
    log = tmp_path_factory.mktemp("fastdds") / "blaster_profile_best_effort.log"
    return _blast(listener, log, profile=True, reliability="best_effort")


# --- real processes --------------------------------------------------------------------------


def test_profile_carries_vga_best_effort_without_drops(profile_run: Run) -> None:
    assert profile_run.published == FRAMES
    assert profile_run.fraction >= MIN_FRACTION, profile_run.line()


def test_shipped_profile_loads_without_fastdds_errors(profile_run: Run) -> None:
    text = profile_run.log.read_text(errors="replace")
    assert fastdds_errors(text) == [], text[-3000:]


def test_broken_profile_is_reported(tmp_path: Path) -> None:
    """The check above would notice a profile Fast DDS cannot parse: a misspelt element makes it
    print XMLPARSER errors (and run with its defaults)."""
    broken = tmp_path / "fastdds.xml"
    text = fastdds.profile_path().read_text(encoding="utf-8")
    assert "<segment_size>" in text
    broken.write_text(text.replace("segment_size>", "segment_sise>"), encoding="utf-8")
    log = tmp_path / "blaster_broken.log"
    cmd = [sys.executable, str(BLASTER), "--count", "0", "--subscribers", "0", "--linger", "0"]
    proc = spawn(cmd, log, env={fastdds.PROFILE_ENV: str(broken)})
    try:
        proc.wait(timeout=30)
    finally:
        stop(proc)
    errors = fastdds_errors(log.read_text(errors="replace"))
    assert any("XMLPARSER" in ln and "segment_sise" in ln for ln in errors), errors


def test_latency_with_and_without_profile(listener, profile_run: Run, tmp_path: Path) -> None:
    """Median latency (receive time minus header.stamp) and delivered fraction, printed, not
    asserted on timing; reliable delivery must stay complete either way."""
    runs = [profile_run]
    for profile, reliability in [(False, "best_effort"), (True, "reliable"), (False, "reliable")]:
        log = tmp_path / f"blaster_{'profile' if profile else 'default'}_{reliability}.log"
        runs.append(_blast(listener, log, profile=profile, reliability=reliability))
    print(f"\nVGA rgb8 Image ({VGA_RGB8_BYTES:,} B), {FRAMES} frames at {RATE_HZ:g} Hz, "
          "publisher process -> test process:")  # fmt: skip
    for run in runs:
        print("  " + run.line())
    for run in runs[2:]:
        assert run.fraction >= MIN_FRACTION, run.line()


# --- profile_path / use_shipped_profile --------------------------------------------------------


def test_profile_path_finds_the_repo_file() -> None:
    path = fastdds.profile_path()
    assert path == (REPO / "config" / "fastdds.xml").resolve()
    assert path.is_absolute() and path.is_file()


def test_shipped_profile_content() -> None:
    """What the profile promises: a default participant with only its own transports, a shared
    memory segment for several VGA frames, UDP on loopback only."""
    root = ET.parse(fastdds.profile_path()).getroot()
    assert root.tag == f"{NS}dds"
    participant = root.find(f"{NS}profiles/{NS}participant")
    assert participant is not None and participant.get("is_default_profile") == "true"
    rtps = participant.find(f"{NS}rtps")
    assert rtps.findtext(f"{NS}useBuiltinTransports") == "false"
    used = [e.text for e in rtps.findall(f"{NS}userTransports/{NS}transport_id")]
    descriptors = {d.findtext(f"{NS}transport_id"): d
                   for d in root.iter(f"{NS}transport_descriptor")}  # fmt: skip
    assert sorted(descriptors[t].findtext(f"{NS}type") for t in used) == ["SHM", "UDPv4"]
    for tid in used:
        desc = descriptors[tid]
        if desc.findtext(f"{NS}type") == "SHM":
            assert int(desc.findtext(f"{NS}segment_size")) >= 4 * VGA_RGB8_BYTES
        else:
            allowed = [i.get("name") for i in desc.iter(f"{NS}interface")]
            assert allowed == ["127.0.0.1"]


def test_use_shipped_profile_sets_the_fastdds_variable() -> None:
    env: dict[str, str] = {"PATH": "/usr/bin"}
    path = fastdds.use_shipped_profile(env)
    assert path == fastdds.profile_path()
    assert env == {"PATH": "/usr/bin", fastdds.PROFILE_ENV: str(path)}


@pytest.mark.parametrize("name", fastdds.PROFILE_ENV_VARS)
def test_use_shipped_profile_respects_a_user_profile(name: str) -> None:
    env = {name: "/home/user/my_fastdds.xml"}
    assert fastdds.use_shipped_profile(env) is None
    assert env == {name: "/home/user/my_fastdds.xml"}


def test_use_shipped_profile_treats_an_empty_variable_as_unset() -> None:
    env = {fastdds.PROFILE_ENV: ""}
    assert fastdds.use_shipped_profile(env) == fastdds.profile_path()
    assert env[fastdds.PROFILE_ENV] == str(fastdds.profile_path())


def test_use_shipped_profile_defaults_to_os_environ(monkeypatch) -> None:
    monkeypatch.setenv(fastdds.PROFILE_ENV, "/home/user/my_fastdds.xml")
    assert fastdds.use_shipped_profile() is None
    assert os.environ[fastdds.PROFILE_ENV] == "/home/user/my_fastdds.xml"


def test_profile_path_falls_back_to_install_prefixes(tmp_path: Path, monkeypatch) -> None:
    """Outside a checkout: the interpreter's prefix (pip), then AMENT_PREFIX_PATH (colcon)."""
    site = tmp_path / "site-packages" / "im2hands_ros"
    site.mkdir(parents=True)
    monkeypatch.setattr(fastdds, "__file__", str(site / "fastdds.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    ws = tmp_path / "ws" / "install" / "im2hands_ros"
    env = {"AMENT_PREFIX_PATH": os.pathsep.join([str(tmp_path / "other"), str(ws)])}
    assert fastdds.profile_path(env) is None
    assert fastdds.use_shipped_profile(env) is None and fastdds.PROFILE_ENV not in env

    in_ws = ws / fastdds.SHARE_RELATIVE
    in_ws.parent.mkdir(parents=True)
    in_ws.write_text("<dds/>")
    assert fastdds.profile_path(env) == in_ws.resolve()
    monkeypatch.setenv("AMENT_PREFIX_PATH", env["AMENT_PREFIX_PATH"])
    assert fastdds.profile_path() == in_ws.resolve()

    in_prefix = tmp_path / "venv" / fastdds.SHARE_RELATIVE
    in_prefix.parent.mkdir(parents=True)
    in_prefix.write_text("<dds/>")
    assert fastdds.profile_path(env) == in_prefix.resolve()
    assert fastdds.use_shipped_profile(env) == in_prefix.resolve()
    assert env[fastdds.PROFILE_ENV] == str(in_prefix.resolve())
