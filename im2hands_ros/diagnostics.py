"""What the node counts, and its ``/diagnostics`` message.

:class:`NodeStats` is thread-safe (the executor thread counts arrivals, the worker thread counts
results and drops); :func:`diagnostic_status` reads a snapshot into a
``diagnostic_msgs/DiagnosticStatus``: rate, latency from image stamp to publication, the
pipeline's own time, frames in and out, drops by reason, backend and device.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from std_msgs.msg import Header

__all__ = ["DROP_REASONS", "NodeStats", "diagnostic_array", "diagnostic_status"]

#: Why a frame was not turned into outputs (the keys of ``NodeStats.drops``).
DROP_REASONS = (
    "superseded",  # a newer frame arrived while it waited (newest-frame-only processing)
    "too_old",  # older than max_frame_age when processing would start
    "bad_image",  # encoding, size, step or data the node cannot read
    "bad_input",  # the pipeline refused the image, intrinsics or keypoints
    "no_keypoints",  # keypoint_source topic: no keypoints with the image's stamp in time
    "error",  # an unexpected exception while processing (logged with its traceback)
)


class NodeStats:
    """Counters and recent timings of a running node (``window`` most recent frames)."""

    def __init__(self, window: int = 300) -> None:
        self._lock = threading.Lock()
        self.frames_in = 0
        self.frames_out = 0
        self.drops: Counter[str] = Counter()
        self.bad_camera_info = 0
        self.bad_keypoints = 0
        self.no_hand = 0
        # depth input (use_depth): frames without a depth image of their stamp, depth images
        # that could not be read, frames with a hand placed without its depth
        self.no_depth = 0
        self.bad_depth = 0
        self.depth_unused = 0
        # tracked_meshes: outputs by kind, and the shape age of the re-posed ones
        self.full = 0
        self.reposed = 0
        self.keypoints_only = 0
        self.full_failed = 0
        self._shape_age_s: deque[float] = deque(maxlen=window)
        self._latency_ms: deque[float] = deque(maxlen=window)
        self._pipeline_ms: deque[float] = deque(maxlen=window)
        self._out_times: deque[float] = deque(maxlen=window)

    def received(self) -> None:
        with self._lock:
            self.frames_in += 1

    def dropped(self, reason: str) -> None:
        with self._lock:
            self.drops[reason] += 1

    def count(self, name: str) -> None:
        """Increment one of the plain counters (``bad_camera_info``, ``bad_keypoints``,
        ``no_hand``, ``no_depth``, ``bad_depth``, ``depth_unused``)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def kind(self, kind: str, shape_age_s: float, failed: int) -> None:
        """Count one tracked output (``full``, ``reposed``, ``keypoints``) and the video's
        failed full reconstructions so far."""
        with self._lock:
            name = "keypoints_only" if kind == "keypoints" else kind
            setattr(self, name, getattr(self, name) + 1)
            self.full_failed = failed
            if kind == "reposed":
                self._shape_age_s.append(shape_age_s)

    def published(self, latency_ms: float, pipeline_ms: float) -> None:
        with self._lock:
            self.frames_out += 1
            self._latency_ms.append(latency_ms)
            self._pipeline_ms.append(pipeline_ms)
            self._out_times.append(time.monotonic())

    def snapshot(self) -> dict[str, Any]:
        """Plain numbers: counts, rate over the last 10 s, latency/pipeline median and p95 (ms)."""
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self._out_times if now - t <= 10.0]
            rate = 0.0
            if len(recent) >= 2:
                rate = (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)
            lat = np.asarray(self._latency_ms, dtype=np.float64)
            pipe = np.asarray(self._pipeline_ms, dtype=np.float64)
            out = {
                "frames_in": self.frames_in,
                "frames_out": self.frames_out,
                "rate_hz": rate,
                "seconds_since_output": (now - self._out_times[-1]) if self._out_times else None,
                "bad_camera_info": self.bad_camera_info,
                "bad_keypoints": self.bad_keypoints,
                "no_hand": self.no_hand,
                "no_depth": self.no_depth,
                "bad_depth": self.bad_depth,
                "depth_unused": self.depth_unused,
                **{f"dropped_{r}": self.drops[r] for r in DROP_REASONS},
            }
            if self.full or self.reposed or self.keypoints_only:
                age = np.asarray(self._shape_age_s, dtype=np.float64)
                out.update(meshes_full=self.full, meshes_reposed=self.reposed,
                           keypoints_only=self.keypoints_only, full_failed=self.full_failed,
                           shape_age_s_median=float(np.median(age)) if age.size else None,
                           )  # fmt: skip
        for name, arr in (("latency_ms", lat), ("pipeline_ms", pipe)):
            out[f"{name}_median"] = float(np.median(arr)) if arr.size else None
            out[f"{name}_p95"] = float(np.percentile(arr, 95)) if arr.size else None
        return out


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def diagnostic_status(
    stats: dict[str, Any], name: str, hardware_id: str, info: dict[str, Any], state: str
) -> DiagnosticStatus:
    """One status from a :meth:`NodeStats.snapshot`: OK while frames come out, WARN when the
    node is inactive, frames arrive but none come out, or the default intrinsics are in use,
    ERROR when frames fail with unexpected errors."""
    level, message = DiagnosticStatus.OK, f"{stats['rate_hz']:.1f} Hz"
    waiting = stats["frames_in"] > 0 and (
        stats["seconds_since_output"] is None or stats["seconds_since_output"] > 5.0
    )
    if state != "active":
        level, message = DiagnosticStatus.WARN, f"node is {state}"
    elif stats["dropped_error"] > 0:
        level, message = DiagnosticStatus.ERROR, f"{stats['dropped_error']} frames failed"
    elif waiting:
        level, message = DiagnosticStatus.WARN, "frames arrive but no output for 5 s"
    elif stats["frames_in"] == 0:
        level, message = DiagnosticStatus.WARN, "no image received yet"
    elif info.get("camera_info") == "default":
        level, message = DiagnosticStatus.WARN, f"{message}; default intrinsics (no CameraInfo)"
    values = {**info, **stats}
    return DiagnosticStatus(
        level=level, name=name, message=message, hardware_id=hardware_id,
        values=[KeyValue(key=k, value=_fmt(v)) for k, v in values.items()],
    )  # fmt: skip


def diagnostic_array(status: DiagnosticStatus, stamp: Any) -> DiagnosticArray:
    return DiagnosticArray(header=Header(stamp=stamp), status=[status])
