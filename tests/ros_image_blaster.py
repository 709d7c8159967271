"""Publish VGA camera frames from a process of its own, for the Fast DDS transport tests.

    python tests/ros_image_blaster.py --count 60 --rate 30 --reliability best_effort

publishes ``--count`` 640 x 480 rgb8 ``sensor_msgs/Image`` messages (about 0.92 MB each, larger
than Fast DDS's default 512 KiB shared-memory segment) on ``--topic`` at ``--rate`` Hz, each
stamped with the wall-clock time at which it is handed to ``publish`` so that a subscriber on this
machine can measure latency as its receive time minus ``header.stamp``. The pixels are noise (a
few pre-drawn frames, each message with its index written into the first bytes) so that nothing
along the way could compress them. Publishing starts once ``--subscribers`` readers have matched
(or after ``--match-timeout`` seconds, with a warning); the process exits after ``--linger``
seconds more, so that a reliable writer can finish repairs. It prints one ``published ...`` line.

Fast DDS reads the profile named by ``FASTDDS_DEFAULT_PROFILES_FILE`` from this process's
environment; the tests choose it per run.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import rclpy
from rclpy.context import Context
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

WIDTH, HEIGHT = 640, 480
TOPIC = "/im2hands_test/vga"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=60, help="frames to publish (0: none)")
    p.add_argument("--rate", type=float, default=30.0, help="frames per second")
    p.add_argument("--reliability", choices=["best_effort", "reliable"], default="best_effort")
    p.add_argument("--topic", default=TOPIC)
    p.add_argument("--depth", type=int, default=10, help="KEEP_LAST history depth")
    p.add_argument("--subscribers", type=int, default=1, help="readers to wait for (0: none)")
    p.add_argument("--match-timeout", type=float, default=15.0)
    p.add_argument("--linger", type=float, default=1.0, help="seconds to stay up at the end")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _frames(seed: int, n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=HEIGHT * WIDTH * 3, dtype=np.uint8) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    context = Context()
    rclpy.init(context=context)
    node = Node("im2hands_image_blaster", context=context)
    try:
        reliability = (
            ReliabilityPolicy.RELIABLE
            if args.reliability == "reliable"
            else ReliabilityPolicy.BEST_EFFORT
        )
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=args.depth, reliability=reliability)
        pub = node.create_publisher(Image, args.topic, qos)

        end = time.monotonic() + args.match_timeout
        while pub.get_subscription_count() < args.subscribers and time.monotonic() < end:
            time.sleep(0.02)
        matched = pub.get_subscription_count()
        if matched < args.subscribers:
            print(f"warning: {matched} of {args.subscribers} subscribers matched", flush=True)

        frames = _frames(args.seed)
        msg = Image(height=HEIGHT, width=WIDTH, encoding="rgb8", is_bigendian=0, step=WIDTH * 3)
        msg.header.frame_id = "im2hands_blaster"
        period = 1.0 / args.rate
        start = time.monotonic()
        for i in range(args.count):
            delay = start + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            buf = frames[i % len(frames)]
            buf[:4] = np.frombuffer(i.to_bytes(4, "little"), np.uint8)
            msg.data = buf.tobytes()
            now = time.time_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now, 1_000_000_000)
            pub.publish(msg)
        took = time.monotonic() - start
        print(
            f"published {args.count} frames of {WIDTH}x{HEIGHT} rgb8 in {took:.2f} s "
            f"({args.reliability}, {matched} subscriber(s))",
            flush=True,
        )
        time.sleep(args.linger)
    except KeyboardInterrupt:  # `stop` from the tests: a clean shutdown below
        return 130
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
