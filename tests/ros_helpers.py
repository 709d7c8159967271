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
        self._subscriptions: dict[str, Any] = {}
        self._publishers: list[Any] = []
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

        self._subscriptions[topic] = self.node.create_subscription(msg_type, topic, cb, qos,
                                                                   raw=raw)  # fmt: skip
        return got

    def publisher(self, topic: str, msg_type: type, reliable: bool = True, depth: int = 10):
        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)  # fmt: skip
        pub = self.node.create_publisher(msg_type, topic, qos)
        self._publishers.append(pub)
        return pub

    def wait_matched(self, timeout: float = 30.0, topics: Sequence[str] | None = None,
                     publishers: Sequence[Any] | None = None) -> None:  # fmt: skip
        """Wait until every publisher made here (or those given) is matched with a
        subscription and every subscription (or those on ``topics``) with a publisher.

        Seeing the other node in the graph (``count_subscribers``) is not enough: DDS matches
        each writer with each reader a little later, and a sample published before its reader
        is matched is lost (volatile durability), which on a loaded machine made single-frame
        tests wait for output that never came.
        """
        subs = [s for t, s in self._subscriptions.items() if topics is None or t in topics]
        pubs = self._publishers if publishers is None else list(publishers)

        def matched() -> bool:
            return all(p.get_subscription_count() > 0 for p in pubs) and all(
                s.get_publisher_count() > 0 for s in subs
            )

        def missing() -> str:
            alone = [p.topic_name for p in pubs if p.get_subscription_count() == 0]
            unmatched = [s.topic_name for s in subs if s.get_publisher_count() == 0]
            return f"publishers {alone} and subscriptions {unmatched} to be matched"

        try:
            wait_for(matched, timeout, "matching")
        except AssertionError:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {missing()}") \
                from None

    def wait_heard(self, info_pub: Any, info_msg: Any, diagnostics: list, timeout: float = 60.0,
                   settle: float = 1.0) -> None:  # fmt: skip
        """Publish the camera info ``info_msg`` every 0.2 s until the node's ``/diagnostics``
        (the list ``listen`` filled) say a camera info arrived, then wait ``settle`` seconds.

        A writer here being matched (:meth:`wait_matched`) does not mean the node's reader has
        matched it: that side of the discovery can lag by many seconds on a loaded machine
        (seen after another node on the same ports had just stopped), and a reader drops samples
        from a writer it does not know yet, so a test that sends one frame would wait forever.
        The node's readers of this process's writers are matched together, hence the settle.
        """
        end = time.monotonic() + timeout

        def heard() -> bool:
            with self._lock:
                last = diagnostics[-1][1] if diagnostics else None
            if last is None or not last.status:
                return False
            values = {kv.key: kv.value for kv in last.status[0].values}
            return values.get("camera_info", "none yet") != "none yet"

        while not heard():
            if time.monotonic() > end:
                raise AssertionError(f"the node heard no camera info in {timeout:.0f} s")
            info_pub.publish(info_msg)
            time.sleep(0.2)
        time.sleep(settle)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        self._thread.join(5)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
