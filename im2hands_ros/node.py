"""The ``im2hands`` node: camera images in; hand meshes, keypoints and contacts out.

A lifecycle node (``rclpy.lifecycle``) and a thin shell over :class:`im2hands_model.Im2Hands`:

* **configure** reads and checks the parameters (:mod:`~im2hands_ros.params`), loads the model,
  reconstructs a few warm-up frames, and creates the publishers;
* **activate** subscribes to the inputs; **deactivate** unsubscribes and lets the running frame
  finish; **cleanup** releases the model and publishers.

With ``autostart`` (the default) the node configures and activates itself, so it also runs
unmanaged: ``im2hands-node --ros-args -p device:=cpu -r image:=/camera/image_raw``.

Inputs (relative names; remap them): ``image`` (``sensor_msgs/Image``) or
``<image>/compressed`` (``sensor_msgs/CompressedImage``, ``image_transport:=compressed``),
``camera_info`` (the latest valid one is used; until one arrives the node warns once and uses
:func:`~im2hands_ros.conversions.default_camera_K`), with ``keypoint_source:=topic``
``keypoints`` (``geometry_msgs/PoseArray``, 42 poses, stamped like its image), and with
``use_depth:=true`` ``depth`` (``sensor_msgs/Image``, ``16UC1`` mm or ``32FC1`` m, registered
to the colour image and stamped like it; a frame without one, or with one that does not fit, is
reconstructed from the image alone and counted in ``/diagnostics``).

Keypoints come from MediaPipe's hand models by default (``keypoint_source:=mediapipe``), tracked
across frames (``track_hands``).

Outputs, stamped with the image's header: ``hands/mesh`` (RViz ``MarkerArray``, one
``TRIANGLE_LIST`` per hand, ``DELETE`` when a hand disappears), ``hands/{left,right}/mesh``
(``PointCloud2`` triangle soups, see :func:`~im2hands_ros.conversions.mesh_to_msg`),
``hands/{left,right}/keypoints`` (``PoseArray``, 21 joints), ``hands/keypoints`` (joint and
bone markers), ``hands/contacts`` (contact markers, penetration coloured by depth),
``hands/contacts/points`` (``PointCloud2`` with depth), ``hands/debug_image`` (the overlay) and
``/diagnostics``.

Frames are processed off the executor thread, newest first (:mod:`~im2hands_ros.worker`; with
``im2hands-node`` on the main thread while the executor spins on another); bad
messages are dropped with a (throttled) warning and counted in ``/diagnostics``.

Ctrl-C (SIGINT) or SIGTERM stops ``im2hands-node`` cleanly (exit code 0): no new frames, the frame
in progress finishes and is published, then the executor, the node and rclpy shut down in that
order; a second signal, or :data:`STOP_GRACE_S` seconds, abandons the frame in progress.
"""

from __future__ import annotations

import _thread
import gc
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseArray
from rclpy.event_handler import QoSRequestedIncompatibleQoSInfo, SubscriptionEventCallbacks
from rclpy.exceptions import InvalidHandle
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from im2hands_ros import conversions as conv
from im2hands_ros import params
from im2hands_ros.diagnostics import NodeStats, diagnostic_array, diagnostic_status
from im2hands_ros.worker import Job, LatestFrameWorker

__all__ = ["OUTPUTS", "Im2HandsNode", "main"]

NODE_NAME = "im2hands"
#: Keypoint messages kept while waiting for their image (keypoint_source topic).
KEYPOINT_BUFFER = 30
#: Depth images kept for pairing with colour images by stamp.
DEPTH_BUFFER = 10
#: Longest wait for the depth image of a colour image that is being processed, seconds.
DEPTH_WAIT_S = 0.1
#: Seconds after activation without any image before the node explains what it subscribes to.
NO_DATA_WARNING_S = 5.0
#: Frames between returns of freed heap memory to the system (glibc ``malloc_trim``).
TRIM_EVERY = 5
#: Seconds ``im2hands-node`` lets the frame in progress finish after SIGINT/SIGTERM before
#: abandoning it (``ros2 launch`` sends SIGTERM 5 s after SIGINT, SIGKILL 5 s later).
STOP_GRACE_S = 5.0
#: What publishing raises once rclpy's context is shut down ("publisher's context is invalid")
#: or the publisher destroyed with it.
_PUBLISH_AFTER_SHUTDOWN = (_rclpy.RCLError, InvalidHandle)


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (``None`` elsewhere). Torch's per-frame buffers of a few MB, freed
    on two threads, leave glibc's heaps holding memory that resident memory then swings by;
    trimming every few frames hands it back, so resident memory tracks what the node really
    holds (docs/measurements.md)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


#: Publications: (key, type, topic relative to the node's namespace); /diagnostics besides.
OUTPUTS: tuple[tuple[str, type, str], ...] = (
    ("mesh", MarkerArray, "hands/mesh"),
    ("left_mesh", PointCloud2, "hands/left/mesh"),
    ("right_mesh", PointCloud2, "hands/right/mesh"),
    ("left_keypoints", PoseArray, "hands/left/keypoints"),
    ("right_keypoints", PoseArray, "hands/right/keypoints"),
    ("keypoint_markers", MarkerArray, "hands/keypoints"),
    ("contact_markers", MarkerArray, "hands/contacts"),
    ("contacts", PointCloud2, "hands/contacts/points"),
    ("debug_image", Image, "hands/debug_image"),
)

Ok = TransitionCallbackReturn.SUCCESS
Failed = TransitionCallbackReturn.FAILURE


def _stamp_s(header: Header) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def _stamp_key(header: Header) -> tuple[int, int]:
    return int(header.stamp.sec), int(header.stamp.nanosec)


class Im2HandsNode(LifecycleNode):
    """The reconstruction node (module docstring). Parameters: :data:`params.PARAMETERS`."""

    def __init__(self, node_name: str = NODE_NAME, own_thread: bool = True, **kwargs: Any) -> None:
        """``own_thread``: frames are processed on a thread the node starts; ``False``: the
        caller runs ``node.worker.run()`` (blocking) on a thread of its choice, as :func:`main`
        does with the main thread while the executor spins on another."""
        super().__init__(node_name, **kwargs)
        params.declare(self)
        self.settings: params.NodeSettings | None = None
        self.model: Any = None
        self.video: Any = None  # tracked_meshes: the VideoReconstruction over self.model
        self.stats = NodeStats()
        self.worker = LatestFrameWorker(
            self._process, self._now, 0.0, self._on_drop, self._on_error, start=own_thread
        )
        self._state = "unconfigured"
        self._subs: list[Any] = []
        self._pubs: dict[str, Any] = {}
        self._camera: tuple[np.ndarray, int, int] | None = None  # K, width, height
        self._keypoints: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._depth: OrderedDict[tuple[int, int], Image] = OrderedDict()
        self._newest_depth: tuple[int, int] | None = None
        self._waiting: Job | None = None  # image waiting for its keypoints
        self._previous_present = (True, True)
        self._last_mesh = self._last_debug = -1e9
        self._activated_at = 0.0
        self._trim = _malloc_trim()
        self._no_data_warned = False
        self._default_K_warned = False
        self._info: dict[str, Any] = {"camera_info": "none yet"}
        self._warned: dict[str, list[float]] = {}  # message -> [last time, repeats since]
        self._warn_lock = threading.Lock()
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(
            1.0 / self.get_parameter("diagnostics_rate").value, self._publish_diagnostics
        )

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        log = self.get_logger()
        try:
            s = self.settings = params.read(self)
        except params.SettingsError as exc:
            log.error(f"cannot configure: {exc}")
            return Failed
        try:
            self.model = self._load_model(s)
        except Exception as exc:  # weights missing or broken, device unavailable, ...
            log.error(f"cannot load the model: {type(exc).__name__}: {exc}")
            self.model = None
            return Failed
        if s.tracked_meshes:
            from im2hands_model.pipeline.video import VideoReconstruction

            try:
                self.video = VideoReconstruction(self.model, worker=s.full_worker,
                                                 max_part_turn_deg=s.max_part_turn_deg)
            except Exception as exc:  # e.g. a model the worker process cannot rebuild
                log.error(f"cannot start the tracked meshes: {type(exc).__name__}: {exc}")
                self.model = None
                return Failed
        cfg = self.model.describe()
        self._info = {"backend": cfg["backend"], "device": cfg["device"],
                      "resolution": self.model.resolution, "keypoint_source": s.keypoint_source,
                      "camera_info": "none yet"}  # fmt: skip
        out = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        for key, msg_type, topic in OUTPUTS:
            self._pubs[key] = self.create_lifecycle_publisher(msg_type, topic, out)
        self.worker.max_age = s.max_frame_age
        gc.collect()
        gc.freeze()  # the model's objects never need scanning again (smaller GC pauses)
        self._state = "inactive"
        log.info(
            f"configured: backend {cfg['backend']} on {cfg['device']}, {self.model.resolution}^3, "
            f"keypoints {s.keypoint_source}, K {s.refine_keypoints}, "
            f"I {'image' if s.use_image else 'keypoints only'}, "
            f"R {'on' if s.refine_occupancy else 'off'}"
            + (", meshes tracked between full reconstructions" if self.video else "")
        )
        return Ok

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        s = self.settings
        assert s is not None
        qos = QoSProfile(
            depth=s.qos_depth,
            reliability=ReliabilityPolicy.RELIABLE
            if s.qos_reliability == "reliable"
            else ReliabilityPolicy.BEST_EFFORT,
        )
        if s.image_transport == "compressed":
            topic = self.resolve_topic_name("image") + "/compressed"
            self._subscribe(CompressedImage, topic, self._on_image, qos)
        else:
            self._subscribe(Image, "image", self._on_image, qos)
        self._subscribe(CameraInfo, "camera_info", self._on_camera_info, qos)
        if s.keypoint_source == "topic":
            self._subscribe(PoseArray, "keypoints", self._on_keypoints, qos)
        if s.use_depth:
            # a few frames deep: the depth image may arrive just after its colour image
            depth_qos = QoSProfile(depth=max(s.qos_depth, DEPTH_BUFFER // 2),
                                   reliability=qos.reliability)  # fmt: skip
            self._subscribe(Image, "depth", self._on_depth, depth_qos)
        self._activated_at = time.monotonic()
        self._no_data_warned = False
        self._state = "active"
        self.get_logger().info(
            "active: listening on " + ", ".join(sub.topic_name for sub in self._subs)
        )
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._unsubscribe()
        self.worker.wait_idle(30.0)
        if self.video is not None:  # the next activation starts a new video
            self.video.reset()
        self._state = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._state = "unconfigured"
        return Ok

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._unsubscribe()
        self._release()
        self.worker.request_stop()
        self._state = "finalized"
        return Ok

    def _unsubscribe(self) -> None:
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs.clear()
        self._waiting = None

    def _release(self) -> None:
        self.worker.wait_idle(30.0)
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs.clear()
        if self.video is not None:
            self.video.close()
        self.model = self.video = None
        self._camera = None
        self._keypoints.clear()
        self._depth.clear()
        self._newest_depth = None
        gc.unfreeze()
        gc.collect()

    def _load_model(self, s: params.NodeSettings) -> Any:
        import torch

        from im2hands_model import Im2Hands

        if s.threads:
            torch.set_num_threads(s.threads)
        model = Im2Hands.from_pretrained(**s.pipeline_config())
        if s.warmup_frames:
            from im2hands_model.pipeline.warmup import warmup

            seconds = warmup(model, s.warmup_frames)  # built-in frame: no renderer needed
            self.get_logger().info(f"warm-up: {seconds:.1f} s")
        return model

    # ------------------------------------------------------------------ inputs (executor thread)
    def _subscribe(self, msg_type: type, topic: str, callback: Any, qos: QoSProfile) -> None:
        events = SubscriptionEventCallbacks(
            incompatible_qos=lambda info, t=topic: self._incompatible_qos(t, info)
        )
        self._subs.append(
            self.create_subscription(msg_type, topic, callback, qos, event_callbacks=events)
        )

    def _incompatible_qos(self, topic: str, info: QoSRequestedIncompatibleQoSInfo) -> None:
        s = self.settings
        self.get_logger().warning(
            f"incompatible QoS on {self.resolve_topic_name(topic)}: a publisher offers QoS that "
            f"this subscription (reliability {s.qos_reliability if s else '?'}) cannot match "
            f"(policy {info.last_policy_kind}, {info.total_count} so far), so its messages never "
            "arrive. A best-effort publisher needs qos_reliability:=best_effort (the default).",
            throttle_duration_sec=10.0,
        )

    def _on_image(self, msg: Image | CompressedImage) -> None:
        self.stats.received()
        stamp = _stamp_s(msg.header)
        now = self._now()
        if stamp == 0.0:
            self.get_logger().warning(
                "images have no stamp (0): frame age and latency are measured from arrival",
                once=True,
            )
            stamp = now
        job = Job(msg, stamp)
        if self.settings is not None and self.settings.keypoint_source == "topic":
            self._pair_image(job)
        else:
            self.worker.submit(job)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            K = conv.camera_info_to_K(msg)
        except conv.ConversionError as exc:
            self.stats.count("bad_camera_info")
            self._warn(f"CameraInfo ignored ({exc}); keeping the previous intrinsics")
            return
        self._camera = (K, int(msg.width), int(msg.height))
        self._info["camera_info"] = "received"

    def _on_keypoints(self, msg: PoseArray) -> None:
        try:
            kp = conv.keypoints_from_pose_array(msg)
        except conv.ConversionError as exc:
            self.stats.count("bad_keypoints")
            self._warn(f"keypoints ignored: {exc}")
            return
        key = _stamp_key(msg.header)
        self._keypoints[key] = kp
        while len(self._keypoints) > KEYPOINT_BUFFER:
            self._keypoints.popitem(last=False)
        waiting = self._waiting
        if waiting is not None:
            wkey = _stamp_key(waiting.payload.header)
            if wkey == key:
                self._waiting = None
                waiting.extra["keypoints"] = kp
                self.worker.submit(waiting)
            elif key > wkey:  # keypoints moved past the waiting image: they never come for it
                self._waiting = None
                self._on_drop(waiting, "no_keypoints")

    def _on_depth(self, msg: Image) -> None:
        key = _stamp_key(msg.header)
        self._depth[key] = msg
        self._newest_depth = key if self._newest_depth is None else max(self._newest_depth, key)
        while len(self._depth) > DEPTH_BUFFER:
            self._depth.popitem(last=False)

    def _depth_for(self, header: Header) -> np.ndarray | None:
        """The depth image stamped like the colour image, decoded; ``None`` (counted) when there
        is none or it cannot be read."""
        key = _stamp_key(header)
        deadline = time.monotonic() + DEPTH_WAIT_S
        msg = self._depth.get(key)
        # a depth image published just after its colour image may still come, unless a later one
        # has arrived already (or none ever did): then waiting would only delay every frame
        while (msg is None and self._newest_depth is not None and self._newest_depth < key
               and time.monotonic() < deadline):  # fmt: skip
            time.sleep(0.005)
            msg = self._depth.get(key)
        if msg is None:
            self.stats.count("no_depth")
            self._warn(f"no depth image with the colour image's stamp on "
                       f"{self.resolve_topic_name('depth')}: hands placed from the image alone "
                       "(counted as no_depth)")  # fmt: skip
            return None
        try:
            return conv.depth_to_array(msg, max_pixels=self.settings.max_pixels)
        except conv.ConversionError as exc:
            self.stats.count("bad_depth")
            self.get_logger().warning(f"depth image ignored ({exc}); hands placed from the image "
                                      "alone (counted as bad_depth)", once=True)  # fmt: skip
            return None

    def _pair_image(self, job: Job) -> None:
        kp = self._keypoints.get(_stamp_key(job.payload.header))
        if kp is not None:
            job.extra["keypoints"] = kp
            self.worker.submit(job)
            return
        if self._waiting is not None:
            self._on_drop(self._waiting, "no_keypoints")
            self._warn(
                f"image dropped: no keypoints with its stamp on "
                f"{self.resolve_topic_name('keypoints')} before the next image (keypoint_source "
                "topic expects one PoseArray per image, stamped like it)"
            )
        self._waiting = job

    def _warn(self, text: str, period: float = 5.0) -> None:
        """Warn once per ``period`` seconds per distinct message (a broken stream repeats the
        same one; a different problem is reported at once), with the count of repeats."""
        now = time.monotonic()
        with self._warn_lock:  # called from the executor and the worker threads
            entry = self._warned.get(text)
            if entry is not None and now - entry[0] < period:
                entry[1] += 1
                return
            repeats = f" (and {int(entry[1])} more like it)" if entry and entry[1] else ""
            if len(self._warned) > 256:
                self._warned.clear()
            self._warned[text] = [now, 0]
        self.get_logger().warning(text + repeats)

    # ------------------------------------------------------------------ processing (worker thread)
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_drop(self, job: Job, reason: str) -> None:
        self.stats.dropped(reason)

    def _on_error(self, job: Job, exc: BaseException) -> None:
        self.stats.dropped("error")
        if not self.context.ok():  # shutting down: the logger's rosout publisher is gone too
            return
        tb = "".join(traceback.format_exception(exc))
        self.get_logger().error(f"frame failed: {tb}", throttle_duration_sec=5.0)

    def _intrinsics(self, width: int, height: int) -> np.ndarray:
        cam = self._camera
        if cam is not None:
            K, w, h = cam
            if (w, h) in ((0, 0), (width, height)):
                return K
            self._warn(
                f"CameraInfo is for {w}x{h} but the image is {width}x{height}: using the "
                "default intrinsics for this image"
            )
        elif not self._default_K_warned:
            self._default_K_warned = True
            self._info["camera_info"] = "default"
            self.get_logger().warning(
                f"no CameraInfo on {self.resolve_topic_name('camera_info')} yet: using the "
                f"default intrinsics (fx = fy = {max(width, height)} px, principal point at "
                "the image centre); metric depth will be off until one arrives"
            )
        return conv.default_camera_K(width, height)

    def _process(self, job: Job) -> None:
        from im2hands_model.pipeline.frame import InputError

        s, model, video = self.settings, self.model, self.video
        if s is None or model is None or self._state != "active":
            return
        msg = job.payload
        try:
            if isinstance(msg, CompressedImage):
                rgb = conv.compressed_to_rgb(msg, max_pixels=s.max_pixels)
            else:
                rgb = conv.image_to_rgb(msg, max_pixels=s.max_pixels, copy=True)
        except conv.ConversionError as exc:
            self.stats.dropped("bad_image")
            self._warn(f"image dropped: {exc}")
            return
        K = self._intrinsics(rgb.shape[1], rgb.shape[0])
        depth = self._depth_for(msg.header) if s.use_depth else None
        try:
            result = (video or model)(rgb, K, keypoints=job.extra.get("keypoints"), depth=depth,
                                      stamp=job.stamp)  # fmt: skip
        except InputError as exc:
            self.stats.dropped("bad_input")
            self._warn(f"frame dropped: {exc}")
            return
        report = model.keypoint_report
        if depth is not None and report is not None and report.depth_issue:
            self.stats.count("depth_unused")
            self.get_logger().warning(f"depth not used for a hand ({report.depth_issue}); it is "
                                      "placed from the image alone (counted as depth_unused)",
                                      once=True)  # fmt: skip
        if result.empty:
            self.stats.count("no_hand")
        elif video is not None:
            self.stats.kind(result.kind, result.shape_age_s, video.counts["failed"])
        header = Header(stamp=msg.header.stamp, frame_id=s.output_frame or msg.header.frame_id)
        if not self.context.ok():  # shut down while reconstructing: nowhere to publish
            return
        try:
            latency_ms = self._publish(result, header, rgb, K, job.stamp)
        except _PUBLISH_AFTER_SHUTDOWN:
            if self.context.ok():
                raise
            return  # the context went down during publishing (Ctrl-C with rclpy's handlers)
        timings = result.timings_ms  # a tracked frame's own time is "frame"
        self.stats.published(latency_ms, float(timings.get("frame", timings.get("total", np.nan))))
        if self._trim is not None and self.stats.frames_out % TRIM_EVERY == 0:
            self._trim(0)

    def _due(self, last: float, rate: float) -> bool:
        return rate == 0 or (rate > 0 and time.monotonic() - last >= 1.0 / rate)

    def _publish(self, result: Any, header: Header, rgb: np.ndarray, K: np.ndarray,
                 stamp: float) -> float:  # fmt: skip
        """Publish every output of one frame; the latency (ms) from the image stamp to the
        ``hands/mesh`` publication (or to the mesh clouds when the markers are rate-limited)."""
        s, pubs = self.settings, self._pubs
        assert s is not None
        for h, side in enumerate(("left", "right")):
            hand = result.hands[h]
            pubs[f"{side}_keypoints"].publish(conv.keypoints_pose_array(hand, header))
            pubs[f"{side}_mesh"].publish(conv.serialized_mesh_cloud(hand, header))
        if self._due(self._last_mesh, s.mesh_rate):
            self._last_mesh = time.monotonic()
            markers = conv.serialized_mesh_markers(result, header,
                                                   previous_present=self._previous_present)
            self._previous_present = conv.mesh_presence(result)
            pubs["mesh"].publish(markers)
        latency_ms = (self._now() - stamp) * 1e3
        pubs["keypoint_markers"].publish(conv.keypoint_markers(result, header))
        pubs["contact_markers"].publish(conv.contact_markers(result.contacts, header))
        pubs["contacts"].publish(conv.contacts_cloud(result.contacts, header))
        if (
            self._due(self._last_debug, s.debug_image_rate)
            and pubs["debug_image"].get_subscription_count()
        ):
            from im2hands_model.pipeline.overlay import overlay

            self._last_debug = time.monotonic()
            pubs["debug_image"].publish(conv.rgb_to_image(overlay(rgb, K, result), header))
        return latency_ms

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        snap = self.stats.snapshot()
        if (
            self._state == "active"
            and snap["frames_in"] == 0
            and not self._no_data_warned
            and time.monotonic() - self._activated_at > NO_DATA_WARNING_S
        ):
            self._no_data_warned = True
            self._explain_no_data()
        name = f"{self.get_name()}: reconstruction"
        device = self._info.get("device", "")
        status = diagnostic_status(snap, name, device, self._info, self._state)
        self._diag_pub.publish(diagnostic_array(status, self.get_clock().now().to_msg()))

    def _explain_no_data(self) -> None:
        """The most common perception-node complaint is silence: say what we listen to and who
        publishes it, with their reliability."""
        for sub in self._subs:
            if sub.msg_type not in (Image, CompressedImage):
                continue
            infos = self.get_publishers_info_by_topic(sub.topic_name)
            offered = ", ".join(
                f"{i.node_namespace.rstrip('/')}/{i.node_name} "
                f"({i.qos_profile.reliability.name.lower()})"
                for i in infos
            )
            self.get_logger().warning(
                f"no image received on {sub.topic_name} after {NO_DATA_WARNING_S:.0f} s; "
                + (f"publishers: {offered}" if infos else "nobody publishes it (remap 'image'?)")
            )


def usage() -> str:
    """``im2hands-node --help``: how to run it, its topics and every parameter."""
    lines = [
        "usage: im2hands-node [--ros-args -p NAME:=VALUE ... -r FROM:=TO ... --params-file FILE]",
        "",
        __doc__.strip(),
        "",
        "Parameters (defaults in config/im2hands.yaml):",
    ]
    for p in params.PARAMETERS:
        lines.append(f"  {p.name} (default {p.default!r}): {p.help}")
    return "\n".join(lines)


class _GracefulStop:
    """SIGINT/SIGTERM handling of :func:`main` (Python handlers instead of rclpy's).

    rclpy's handlers shut the context down at once, from another thread, while the main thread
    may be publishing a frame (a ``publisher's context is invalid`` traceback), and then raise
    ``KeyboardInterrupt`` wherever the main thread happens to be. Here the first signal only
    stops the worker (no new frames; the one in progress finishes and is published) and
    :func:`main` then shuts everything down in order. A second signal, or :data:`STOP_GRACE_S`
    seconds without the frame finishing, raises ``KeyboardInterrupt`` in the main thread to
    abandon it; signals during the final shutdown are ignored. The handlers run on the main
    thread between bytecodes, so they never interrupt a C call (a publish) half-way.
    """

    def __init__(self, grace: float = STOP_GRACE_S) -> None:
        self.requested = False
        self.node: Im2HandsNode | None = None
        self._grace = grace
        self._finishing = False
        self._timer: threading.Timer | None = None
        # (handlers can only be set on the main thread; elsewhere the defaults stay)
        on_main = threading.current_thread() is threading.main_thread()
        sigs = (signal.SIGINT, signal.SIGTERM) if on_main else ()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in sigs}

    def _handle(self, signum: int, frame: Any) -> None:
        if self._finishing:
            return
        if self.requested or self.node is None:
            raise KeyboardInterrupt  # abandon what is running (a frame, the configuration)
        self.requested = True
        worker = self.node.worker
        doing = "finishing the frame in progress" if worker.busy else "no frame in progress"
        self.node.get_logger().info(f"{signal.Signals(signum).name}: stopping ({doing})")
        worker.request_stop()
        self._timer = threading.Timer(self._grace, _thread.interrupt_main)  # a second signal
        self._timer.daemon = True
        self._timer.start()

    def finish(self) -> None:
        """From now on signals are ignored (the shutdown is under way)."""
        self._finishing = True
        if self._timer is not None:
            self._timer.cancel()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """``im2hands-node [--ros-args ...]``: the node, unmanaged unless ``autostart:=false``.

    The executor spins on a background thread and frames are reconstructed on the main thread
    (see :class:`~im2hands_ros.worker.LatestFrameWorker`: torch runs faster there). SIGINT and
    SIGTERM stop it cleanly (:class:`_GracefulStop`); the exit code is then 0."""
    args = list(sys.argv if argv is None else argv)
    plain = args[1 : args.index("--ros-args")] if "--ros-args" in args else args[1:]
    if "-h" in plain or "--help" in plain:
        print(usage())
        return 0
    from im2hands_ros.fastdds import use_shipped_profile

    use_shipped_profile()  # VGA frames between processes without drops (config/fastdds.xml)
    stop = _GracefulStop()
    node: Im2HandsNode | None = None
    executor: SingleThreadedExecutor | None = None
    spinner: threading.Thread | None = None

    def spin() -> None:
        assert executor is not None and node is not None
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            node.worker.request_stop()

    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        node = Im2HandsNode(own_thread=False)
        stop.node = node
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        rclpy.get_default_context().on_shutdown(node.worker.request_stop)
        if node.get_parameter("autostart").value:
            node.trigger_configure()
            if stop.requested:
                return 0
            if node._state != "inactive":
                node.get_logger().fatal("configure failed (see above); exiting")
                return 2
            node.trigger_activate()
        spinner = threading.Thread(target=spin, name="im2hands-executor", daemon=True)
        spinner.start()
        node.worker.run()  # until a signal (or a shutdown of the context)
    except KeyboardInterrupt:
        pass
    finally:
        stop.finish()
        if executor is not None:
            executor.shutdown(timeout_sec=STOP_GRACE_S)  # no more callbacks
        if spinner is not None:
            spinner.join(STOP_GRACE_S)
        if node is not None:
            if node._state in ("active", "inactive"):
                node._release()
            node.destroy_node()
        rclpy.try_shutdown()
        stop.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
