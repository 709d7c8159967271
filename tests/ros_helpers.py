"""Real ROS 2 processes for the tests: start a console script in its own process, and listen to
topics from the test process with a real rclpy node spun in a background thread.

The environment (localhost-only discovery, a domain per test run) comes from ``conftest.py``;
child processes inherit it.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy

from im2hands_ros.demo import console_script, spawn_logged, stop_process


def spawn(args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``args`` (a console script name is looked up next to this Python) in a new process
    group, stdout and stderr to ``log``; ``env`` adds to this process's environment."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return spawn_logged([console_script(args[0]), *args[1:]], log, full_env)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGINT (a clean rclpy shutdown), then SIGKILL after ``timeout``; the exit code."""
    return stop_process(proc, timeout)


def wait_for(pred: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    """Poll ``pred`` until true; fail with ``what`` (and the tail of ``log``) after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


class Listener:
    """A real rclpy node in the test process that records what arrives on topics.

    Use as a context manager; ``listen(topic, type)`` returns the list that fills up with
    ``(receive_time_ns, msg)`` pairs. ``publisher(topic, type)`` for input publishers.
    """

    def __init__(self, name: str = "test_listener") -> None:
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = Node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._lock = threading.Lock()
        self._thread.start()

    def _spin(self) -> None:
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # context shut down mid-spin
                break

    def listen(self, topic: str, msg_type: type, reliable: bool = False,
               depth: int = 10, raw: bool = False) -> list[tuple[int, Any]]:  # fmt: skip
        got: list[tuple[int, Any]] = []
        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)  # fmt: skip

        def cb(msg: Any) -> None:
            with self._lock:
                got.append((time.time_ns(), msg))

        self.node.create_subscription(msg_type, topic, cb, qos, raw=raw)
        return got

    def publisher(self, topic: str, msg_type: type, reliable: bool = True, depth: int = 10):
        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)  # fmt: skip
        return self.node.create_publisher(msg_type, topic, qos)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        self._thread.join(5)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
