"""A recorder node for the demo and for measuring a running im2hands node from the outside.

It listens to what the node publishes and to the synthetic camera's ground truth, and keeps:

* the arrival time of every ``hands/mesh`` message and its stamp (the image's): end-to-end
  latency = arrival - stamp, clocks shared on one machine. The MarkerArray is subscribed *raw*
  (serialised bytes) and only its first stamp is read (:func:`marker_array_stamp`): deserialising
  60k ``geometry_msgs/Point`` objects per frame would cost the recorder ~100 ms of CPU that the
  node, on the same cores, needs more;
* the per-hand meshes (``hands/{left,right}/mesh``) and ground-truth meshes and keypoints of the
  same stamps, for PLY files and IoU afterwards; all kept as messages and decoded only for the
  frames that are scored (merging the corners of every arriving mesh took most of a core);
* the overlays (``hands/debug_image``) and the node's latest ``/diagnostics`` values.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseArray
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, PointCloud2
from visualization_msgs.msg import MarkerArray

from im2hands_ros import conversions as conv

__all__ = ["FrameRecord", "Recorder", "marker_array_stamp"]

#: Node outputs kept with their meshes (older ones keep only their latency).
KEEP_FRAMES = 64
#: Ground-truth frames kept while their outputs may still come (rate x latency, with margin).
KEEP_GROUND_TRUTH = 600


def marker_array_stamp(data: bytes) -> tuple[int, int] | None:
    """``(sec, nanosec)`` of the first marker of a serialised ``visualization_msgs/MarkerArray``
    (little-endian CDR, as rmw_fastrtps writes it), or ``None`` for an empty array.

    Layout: a 4-byte encapsulation header (``00 01`` = CDR little-endian), the uint32 marker
    count, then the first marker's ``std_msgs/Header``, starting with ``int32 sec`` and
    ``uint32 nanosec``.
    """
    if len(data) < 8 or data[:2] not in (b"\x00\x01", b"\x00\x00"):
        raise ValueError("not a CDR-encapsulated message")
    endian = "<" if data[1] == 1 else ">"
    (count,) = struct.unpack_from(endian + "I", data, 4)
    if count == 0:
        return None
    sec, nsec = struct.unpack_from(endian + "iI", data, 8)
    return int(sec), int(nsec)


@dataclass
class FrameRecord:
    """What arrived for one image stamp."""

    stamp: tuple[int, int]
    mesh_arrival_ns: int | None = None
    #: the node's meshes per side, decoded by :meth:`Recorder.complete_frames`
    meshes: dict[str, tuple[np.ndarray, np.ndarray] | None] = field(default_factory=dict)
    #: the node's mesh clouds as they arrived (decoding every one cost the recorder most of a core)
    mesh_msgs: dict[str, PointCloud2] = field(default_factory=dict)
    gt_meshes: dict[str, tuple[np.ndarray, np.ndarray] | None] = field(default_factory=dict)
    gt_keypoints: np.ndarray | None = None
    #: the node's keypoints per side (``[21, 3]``; ``None`` for a hand it did not find)
    keypoints: dict[str, np.ndarray | None] = field(default_factory=dict)
    overlay: np.ndarray | None = None

    @property
    def latency_ms(self) -> float | None:
        if self.mesh_arrival_ns is None:
            return None
        return (self.mesh_arrival_ns - (self.stamp[0] * 10**9 + self.stamp[1])) / 1e6


class Recorder:
    """Subscriptions on ``node`` (a plain rclpy node the caller spins) that fill
    :attr:`frames` (latest :data:`KEEP_FRAMES` stamps) and :attr:`latencies_ms` (all)."""

    def __init__(self, node: Node, hands_ns: str = "hands", ground_truth_ns: str = "ground_truth"):
        self.node = node
        self._lock = threading.Lock()
        self.frames: OrderedDict[tuple[int, int], FrameRecord] = OrderedDict()
        self._gt: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
        self.latencies_ms: list[float] = []
        self.mesh_messages = 0
        self.diagnostics: dict[str, str] = {}
        rel = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        node.create_subscription(MarkerArray, f"{hands_ns}/mesh", self._on_markers, rel, raw=True)
        for side in ("left", "right"):
            node.create_subscription(PointCloud2, f"{hands_ns}/{side}/mesh",
                                     lambda m, s=side: self._on_mesh(m, s, False), rel)  # fmt: skip
            node.create_subscription(PointCloud2, f"{ground_truth_ns}/{side}/mesh",
                                     lambda m, s=side: self._on_mesh(m, s, True), rel)  # fmt: skip
            node.create_subscription(PoseArray, f"{hands_ns}/{side}/keypoints",
                                     lambda m, s=side: self._on_kp(m, s), rel)  # fmt: skip
        node.create_subscription(PoseArray, f"{ground_truth_ns}/keypoints", self._on_gt_kp, rel)
        node.create_subscription(Image, f"{hands_ns}/debug_image", self._on_overlay, rel)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)

    def _record(self, stamp: tuple[int, int]) -> FrameRecord:
        rec = self.frames.get(stamp)
        if rec is None:
            rec = self.frames[stamp] = FrameRecord(stamp)
            while len(self.frames) > KEEP_FRAMES:
                self.frames.popitem(last=False)
        return rec

    def _ground_truth(self, stamp: tuple[int, int]) -> dict[str, Any]:
        gt = self._gt.get(stamp)
        if gt is None:
            gt = self._gt[stamp] = {"meshes": {}, "keypoints": None}
            while len(self._gt) > KEEP_GROUND_TRUTH:
                self._gt.popitem(last=False)
        return gt

    def _on_markers(self, data: bytes) -> None:
        now = time.time_ns()
        stamp = marker_array_stamp(bytes(data))
        if stamp is None:
            return
        with self._lock:
            self.mesh_messages += 1
            rec = self._record(stamp)
            rec.mesh_arrival_ns = now
            self.latencies_ms.append(rec.latency_ms)

    def _on_mesh(self, msg: PointCloud2, side: str, ground_truth: bool) -> None:
        stamp = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        with self._lock:
            if ground_truth:  # every camera frame: decoded later, only for frames with output
                self._ground_truth(stamp)["meshes"][side] = msg
            else:
                self._record(stamp).mesh_msgs[side] = msg

    def _on_kp(self, msg: PoseArray, side: str) -> None:
        xyz = np.array([[p.position.x, p.position.y, p.position.z] for p in msg.poses])
        with self._lock:
            record = self._record((msg.header.stamp.sec, msg.header.stamp.nanosec))
            record.keypoints[side] = xyz.reshape(21, 3) if len(xyz) == 21 else None

    def _on_gt_kp(self, msg: PoseArray) -> None:
        kp = conv.keypoints_from_pose_array(msg)
        with self._lock:
            self._ground_truth((msg.header.stamp.sec, msg.header.stamp.nanosec))["keypoints"] = kp

    def _on_overlay(self, msg: Image) -> None:
        rgb = conv.image_to_rgb(msg, copy=True)
        with self._lock:
            self._record((msg.header.stamp.sec, msg.header.stamp.nanosec)).overlay = rgb

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.endswith(": reconstruction"):
                with self._lock:
                    self.diagnostics = {kv.key: kv.value for kv in status.values}

    def complete_frames(self) -> list[FrameRecord]:
        """Frames with both the node's meshes and the ground truth (oldest first)."""
        with self._lock:
            out = []
            for rec in self.frames.values():
                gt = self._gt.get(rec.stamp)
                if (
                    len(rec.mesh_msgs) == 2
                    and gt
                    and len(gt["meshes"]) == 2
                    and gt["keypoints"] is not None
                ):
                    if not rec.meshes:
                        rec.meshes = {k: conv.mesh_from_msg(m) for k, m in rec.mesh_msgs.items()}
                    rec.gt_meshes = {k: conv.mesh_from_msg(m) for k, m in gt["meshes"].items()}
                    rec.gt_keypoints = gt["keypoints"]
                    out.append(rec)
            return out

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"latencies_ms": list(self.latencies_ms), "diagnostics": dict(self.diagnostics),
                    "mesh_messages": self.mesh_messages}  # fmt: skip
