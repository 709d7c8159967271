"""Test-wide settings.

ROS 2 (Kilted) must keep DDS discovery on this machine and each test run needs its own domain, so
that parallel runs (and any robot on the network) never see each other. `make test` sets both;
these defaults cover a plain `pytest` too. They must be set before anything imports rclpy.
"""

import os

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
# Fast DDS on Linux accepts domain ids 0..101 (port arithmetic); stay within 1..90.
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 90 + 1))
