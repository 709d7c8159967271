"""``im2hands-synthetic-camera``: a ROS 2 camera that publishes rendered two-hand frames.

The node (name ``synthetic_camera``) renders ``frames`` distinct 640x480 camera frames with the
project's synthetic generator (:func:`im2hands_model.pipeline.bench.synthetic_frames`: the same
scenes as ``im2hands bench`` for the same ``seed``), turns each into its messages once, releases
the renderer, and then cycles through them at ``rate`` Hz, stamping every frame with the ROS clock
at publish time. It stands in for a real camera in the demo and the tests, and comes with the
ground truth of every frame, so the reconstruction node can be fed and checked without hardware.

Rendering runs on the CPU (EGL/llvmpipe) and takes about a second per frame on a small machine,
so start-up takes a few seconds; per published frame the node only stamps and publishes
prebuilt messages.

Topics (relative names: namespaces and remappings apply):

``image`` (``sensor_msgs/Image``)
    The frame, ``rgb8`` or ``bgr8`` (parameter ``encoding``), 640x480, no row padding.
    QoS: depth 1, reliability from the ``reliability`` parameter (best effort by default, so
    subscribers must be best effort too, e.g. ``qos_profile_sensor_data``).
``image/compressed`` (``sensor_msgs/CompressedImage``, only with ``compressed:=true``)
    The same frame as a JPEG (quality 90; ``format`` as image_transport writes it, e.g.
    ``"rgb8; jpeg compressed bgr8"``), published in addition to ``image`` (after
    ``camera_info``), with the QoS of ``image``.
``depth`` (``sensor_msgs/Image``, unless ``depth:=off``)
    The rendered depth registered to ``image`` (camera z; ``16UC1`` millimetres by default or
    ``32FC1`` metres, parameter ``depth``; 0 where nothing was rendered), published right after
    the image with the same stamp and QoS.
``camera_info`` (``sensor_msgs/CameraInfo``)
    The intrinsics of the frame (undistorted pinhole, ``plumb_bob`` with zero distortion),
    published right after the image. QoS: reliable, depth 1 (matches both reliable and best
    effort subscribers).
``ground_truth/keypoints`` (``geometry_msgs/PoseArray``)
    The 21 joints of both hands as 42 poses (left 0-20, right 21-41; camera frame, metres;
    NaN positions for an absent hand): the reconstruction node's external keypoint format, so
    it can be pointed at this topic. QoS: reliable, depth 10.
``ground_truth/left/mesh``, ``ground_truth/right/mesh`` (``sensor_msgs/PointCloud2``)
    The ground-truth mesh of each hand as a triangle soup in the layout of
    :func:`im2hands_ros.conversions.mesh_to_msg` (decode with
    :func:`~im2hands_ros.conversions.mesh_from_msg`); an empty cloud for an absent hand.
    QoS: reliable, depth 10.

All messages of one frame carry the same header: the stamp (ROS clock, so ``use_sim_time``
applies) and ``frame_id``. Everything is in the OpenCV optical frame of the camera (x right,
y down, z forward, metres).

Parameters (``--ros-args -p name:=value``, read once at start-up):

``rate`` (float, default 30.0)
    Frames per second, > 0 and at most 1000.
``frames`` (int, default 8)
    Number of distinct frames rendered at start-up and then cycled (1 to 10000).
``seed`` (int, default ``im2hands_model.pipeline.bench.BENCH_SEED``)
    Seed of the synthetic scenes (>= 0).
``frame_id`` (string, default ``camera_optical_frame``)
    ``frame_id`` of every header.
``encoding`` (string, ``rgb8`` or ``bgr8``, default ``rgb8``)
    Encoding of ``image``.
``compressed`` (bool, default false)
    Also publish ``image/compressed``.
``count`` (int, default 0)
    Publish this many frames, then exit with status 0; 0 publishes until interrupted.
``reliability`` (string, ``best_effort`` or ``reliable``, default ``best_effort``)
    Reliability of ``image``, ``image/compressed`` and ``depth``.
``depth`` (string, ``16UC1``, ``32FC1`` or ``off``, default ``16UC1``)
    Encoding of the ``depth`` topic, or no depth topic.
``realism`` (bool, default false)
    Realistic renders: arms, body-anchored views, photo backgrounds, light and camera effects
    (:mod:`im2hands_model.data.realism`); the same hands and poses either way.
``depth_noise`` (bool, default false)
    The ``depth`` topic as a consumer active-stereo camera measures it: disparity steps and
    noise, no measurement closer than its range, holes along edges and small dropouts.
``sequence`` (int, default 0)
    0: cycle ``frames`` still scenes. N >= 2: play moving hands through N two-hand key scenes,
    one second apart at ``rate`` (:mod:`im2hands_model.data.sequences`), forth and back, with
    the ground truth of every frame (``frames``, ``realism`` and ``depth_noise`` do not
    apply).

A bad parameter value is logged as an error and the process exits with status 2. SIGINT and
SIGTERM stop the node cleanly (status 0), also while it is still rendering.

Example::

    im2hands-synthetic-camera --ros-args -p rate:=15.0 -p frames:=4 -r __ns:=/camera
"""

from __future__ import annotations

import io
import math
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np

__all__ = ["CameraConfig", "ParameterError", "main"]

NODE_NAME = "synthetic_camera"
JPEG_QUALITY = 90
MAX_RATE_HZ = 1000.0
MAX_FRAMES = 10_000
SPIN_TIMEOUT_S = 0.1  # longest wait before a signal is noticed while publishing
ACK_TIMEOUT_S = 2.0  # how long a ``count`` run waits for reliable subscribers before exiting

# parameter descriptions; the defaults are in _defaults (the seed's needs the bench module)
_DESCRIPTIONS: dict[str, str] = {
    "rate": "frames per second (float, > 0, at most 1000)",
    "frames": "distinct frames rendered at start-up and cycled (int, 1 to 10000)",
    "seed": "seed of the synthetic scenes (int, >= 0)",
    "frame_id": "frame_id of every published header",
    "encoding": "encoding of the image topic: rgb8 or bgr8",
    "compressed": "also publish image/compressed (JPEG)",
    "count": "publish this many frames and exit (int, >= 0; 0 = until interrupted)",
    "reliability": "QoS reliability of image and image/compressed: best_effort or reliable",
    "depth": "encoding of the depth topic: 16UC1 (millimetres), 32FC1 (metres) or off",
    "realism": "realistic renders: arms, photo backgrounds, light, camera effects (bool)",
    "depth_noise": "depth as a consumer depth camera measures it: noise, steps, holes (bool)",
    "sequence": "0: cycle still frames; N >= 2: moving hands through N key scenes (int)",
}


class ParameterError(ValueError):
    """A parameter value the camera cannot use (the process exits with status 2)."""


class _Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while rendering (a BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way wraps it)."""


@dataclass(frozen=True)
class CameraConfig:
    """The node's parameters, validated."""

    rate: float
    frames: int
    seed: int
    frame_id: str
    encoding: str
    compressed: bool
    count: int
    reliability: str
    depth: str = "16UC1"
    realism: bool = False
    depth_noise: bool = False
    sequence: int = 0

    @staticmethod
    def from_values(values: dict[str, Any]) -> CameraConfig:
        """Validate raw parameter values (as ROS hands them over: ints where a float is asked
        for are accepted).

        Raises:
            ParameterError: a wrong type or an out-of-range value, naming the parameter.
        """

        def integer(name: str, low: int, high: int | None = None) -> int:
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ParameterError(f"parameter '{name}' must be an integer, got {v!r}")
            if v < low or (high is not None and v > high):
                bound = f">= {low}" if high is None else f"between {low} and {high}"
                raise ParameterError(f"parameter '{name}' must be {bound}, got {v}")
            return v

        def choice(name: str, options: Sequence[str]) -> str:
            v = values[name]
            if v not in options:
                raise ParameterError(
                    f"parameter '{name}' must be one of {', '.join(options)}, got {v!r}"
                )
            return str(v)

        rate = values["rate"]
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise ParameterError(f"parameter 'rate' must be a number (Hz), got {rate!r}")
        rate = float(rate)
        if not (math.isfinite(rate) and 0.0 < rate <= MAX_RATE_HZ):
            raise ParameterError(
                f"parameter 'rate' must be > 0 and at most {MAX_RATE_HZ:g} Hz, got {rate:g}"
            )
        frame_id = values["frame_id"]
        if not isinstance(frame_id, str) or not frame_id.strip():
            raise ParameterError(
                f"parameter 'frame_id' must be a non-empty string, got {frame_id!r}"
            )
        compressed = values["compressed"]
        if not isinstance(compressed, bool):
            raise ParameterError(
                f"parameter 'compressed' must be true or false, got {compressed!r}"
            )
        flags = {}
        for name in ("realism", "depth_noise"):
            flags[name] = values.get(name, False)
            if not isinstance(flags[name], bool):
                raise ParameterError(
                    f"parameter '{name}' must be true or false, got {flags[name]!r}")
        sequence = integer("sequence", 0, 60) if "sequence" in values else 0
        if sequence == 1:
            raise ParameterError("parameter 'sequence' must be 0 or at least 2 key scenes, got 1")
        return CameraConfig(
            sequence=sequence,
            **flags,
            rate=rate,
            frames=integer("frames", 1, MAX_FRAMES),
            seed=integer("seed", 0),
            frame_id=frame_id,
            encoding=choice("encoding", ("rgb8", "bgr8")),
            compressed=compressed,
            count=integer("count", 0),
            reliability=choice("reliability", ("best_effort", "reliable")),
            depth=choice("depth", ("16UC1", "32FC1", "off")),
        )


def _defaults() -> dict[str, Any]:
    from im2hands_model.pipeline.bench import BENCH_SEED

    return {
        "rate": 30.0,
        "frames": 8,
        "seed": BENCH_SEED,
        "frame_id": "camera_optical_frame",
        "encoding": "rgb8",
        "compressed": False,
        "count": 0,
        "reliability": "best_effort",
        "depth": "16UC1",
        "realism": False,
        "depth_noise": False,
        "sequence": 0,
    }


@dataclass
class _FrameMessages:
    """The prebuilt messages of one frame (only their headers change per publish)."""

    image: Any
    compressed: Any | None
    camera_info: Any
    keypoints: Any
    meshes: tuple[Any, Any]
    depth: Any | None = None

    def all(self) -> list[Any]:
        msgs = [self.image, self.camera_info, self.keypoints, *self.meshes]
        msgs += [m for m in (self.compressed, self.depth) if m is not None]
        return msgs


def _jpeg(rgb: np.ndarray, header: Any, encoding: str) -> Any:
    """A JPEG ``sensor_msgs/CompressedImage`` of an RGB frame."""
    from PIL import Image as PILImage
    from sensor_msgs.msg import CompressedImage

    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY)
    msg = CompressedImage()
    msg.header = header
    msg.format = f"{encoding}; jpeg compressed bgr8"
    msg.data = buf.getvalue()
    return msg


def _frame_messages(frame: Any, header: Any, config: CameraConfig) -> _FrameMessages:
    """Messages of one :class:`~im2hands_model.pipeline.bench.BenchFrame`."""
    import trimesh

    from im2hands_model.pipeline.result import HAND_NAMES, HandResult
    from im2hands_ros import conversions as conv

    h, w = frame.image.shape[:2]
    hands = [
        HandResult(
            side=HAND_NAMES[i],
            mesh=trimesh.Trimesh(frame.vertices[i], frame.faces[i], process=False),
            keypoints=frame.joints[i],
            confidence=1.0,
        )
        if frame.present[i]
        else None
        for i in range(2)
    ]
    return _FrameMessages(
        image=conv.rgb_to_image(frame.image, header, config.encoding),
        compressed=_jpeg(frame.image, header, config.encoding) if config.compressed else None,
        camera_info=conv.camera_info_from_K(frame.K, w, h, header),
        keypoints=conv.keypoints_to_pose_array(frame.keypoints, header),
        meshes=(conv.mesh_to_msg(hands[0], header), conv.mesh_to_msg(hands[1], header)),
        depth=None if config.depth == "off" or frame.depth is None
        else conv.depth_to_image(frame.depth, header, config.depth),
    )


class SyntheticCamera:
    """The ``synthetic_camera`` node: parameters, pre-rendered messages and the publish timer.

    Constructing it declares and validates the parameters (raising :class:`ParameterError`);
    :meth:`prepare` renders the frames; :meth:`start` creates the publishers and the timer.
    """

    def __init__(self, context: Any = None) -> None:
        from rcl_interfaces.msg import ParameterDescriptor
        from rclpy.node import Node

        self.node = Node(NODE_NAME, context=context)
        try:
            values = {}
            for name, default in _defaults().items():
                descriptor = ParameterDescriptor(
                    description=_DESCRIPTIONS[name], read_only=True, dynamic_typing=True
                )
                values[name] = self.node.declare_parameter(name, default, descriptor).value
            self.config = CameraConfig.from_values(values)
        except Exception:
            self.node.destroy_node()
            raise
        self.frames: list[_FrameMessages] = []
        self.published = 0
        self.done = False
        self._timer: Any = None
        self._pubs: dict[str, Any] = {}

    @property
    def logger(self) -> Any:
        return self.node.get_logger()

    def prepare(self) -> None:
        """Render the frames (releasing the renderer) and build their messages."""
        from std_msgs.msg import Header

        from im2hands_model.pipeline.bench import synthetic_frames

        c = self.config
        t0 = time.monotonic()
        if c.sequence:
            from im2hands_model.pipeline.tracking_bench import sequence_frames

            self.logger.info(f"rendering a sequence through {c.sequence} key scenes "
                             f"(seed {c.seed}) ...")  # fmt: skip
            frames = [f for _, f in sequence_frames(c.seed, c.sequence, fps=c.rate)]
            frames = frames + frames[-2:0:-1]  # forth and back: no jump when it starts again
        else:
            self.logger.info(f"rendering {c.frames} frame(s) (seed {c.seed}) ...")
            frames = synthetic_frames(c.frames, seed=c.seed, realism=c.realism,
                                      depth_noise=c.depth_noise)
        t1 = time.monotonic()
        header = Header(frame_id=c.frame_id)
        self.frames = [_frame_messages(f, header, c) for f in frames]
        t2 = time.monotonic()
        self.logger.info(
            f"rendered {len(frames)} frame(s) in {t1 - t0:.1f} s "
            f"({(t1 - t0) / len(frames):.2f} s per frame), messages built in {t2 - t1:.2f} s"
        )

    def start(self) -> None:
        """Create the publishers and the publish timer."""
        from geometry_msgs.msg import PoseArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

        c = self.config
        image_qos = QoSProfile(
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE
            if c.reliability == "reliable"
            else ReliabilityPolicy.BEST_EFFORT,
        )
        info_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        gt_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        make = self.node.create_publisher
        self._pubs = {
            "image": make(Image, "image", image_qos),
            "camera_info": make(CameraInfo, "camera_info", info_qos),
            "keypoints": make(PoseArray, "ground_truth/keypoints", gt_qos),
            "left": make(PointCloud2, "ground_truth/left/mesh", gt_qos),
            "right": make(PointCloud2, "ground_truth/right/mesh", gt_qos),
        }
        if c.compressed:
            self._pubs["compressed"] = make(CompressedImage, "image/compressed", image_qos)
        if c.depth != "off":
            self._pubs["depth"] = make(Image, "depth", image_qos)
        self._timer = self.node.create_timer(1.0 / c.rate, self._tick)
        self.logger.info(
            f"ready: {len(self.frames)} frames, publishing at {c.rate:g} Hz"
            + (f" ({c.count} frames)" if c.count else "")
        )

    def _tick(self) -> None:
        if self.done:
            return
        msgs = self.frames[self.published % len(self.frames)]
        stamp = self.node.get_clock().now().to_msg()
        for m in msgs.all():
            m.header.stamp = stamp
        p = self._pubs
        p["image"].publish(msgs.image)
        if msgs.depth is not None:
            p["depth"].publish(msgs.depth)
        p["camera_info"].publish(msgs.camera_info)
        if msgs.compressed is not None:
            p["compressed"].publish(msgs.compressed)
        p["keypoints"].publish(msgs.keypoints)
        p["left"].publish(msgs.meshes[0])
        p["right"].publish(msgs.meshes[1])
        self.published += 1
        if self.config.count and self.published >= self.config.count:
            self.done = True
            self._timer.cancel()

    def flush(self) -> None:
        """Wait (briefly) until reliable subscribers acknowledged everything published."""
        from rclpy.duration import Duration

        for pub in self._pubs.values():
            pub.wait_for_all_acked(Duration(seconds=ACK_TIMEOUT_S))

    def destroy(self) -> None:
        self.node.destroy_node()


def _usage() -> str:
    return (__doc__ or "").strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the node until interrupted or ``count`` frames are out.

    Args:
        argv: the full command line as rclpy reads it (program name first, ROS arguments after
            ``--ros-args``); ``None`` for ``sys.argv``.

    Returns:
        0 after a clean stop, 2 for bad arguments or parameter values.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions
    from rclpy.utilities import remove_ros_args

    args = list(sys.argv if argv is None else argv)
    try:
        extra = remove_ros_args(args)[1:]
    except Exception as exc:  # malformed --ros-args (rclpy raises its RCLInvalidROSArgsError)
        sys.stderr.write(f"{NODE_NAME}: cannot parse the ROS arguments: {exc}\n")
        return 2
    if any(a in ("-h", "--help") for a in extra):
        sys.stdout.write(_usage())
        return 0
    if extra:
        sys.stderr.write(
            f"{NODE_NAME}: unexpected arguments {' '.join(extra)!r}; settings are ROS "
            "parameters: --ros-args -p name:=value (see --help)\n"
        )
        return 2

    # Own signal handling: until the frames are ready a signal interrupts at once; while
    # publishing it ends the spin loop, so the node is torn down outside any callback.
    state = {"interrupt": True, "stop": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        state["stop"] = True
        if state["interrupt"]:
            raise _Interrupted

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    from im2hands_ros.fastdds import use_shipped_profile

    use_shipped_profile()  # VGA frames to other processes without drops (config/fastdds.xml)
    context = rclpy.Context()
    camera: SyntheticCamera | None = None
    executor: SingleThreadedExecutor | None = None
    try:
        try:
            rclpy.init(args=args, context=context, signal_handler_options=SignalHandlerOptions.NO)
        except Exception as exc:  # malformed --ros-args (rclpy raises its RCLError)
            sys.stderr.write(f"{NODE_NAME}: cannot parse the ROS arguments: {exc}\n")
            return 2
        try:
            camera = SyntheticCamera(context=context)
        except Exception as exc:  # ParameterError, or rclpy rejecting an override
            rclpy.logging.get_logger(NODE_NAME).error(f"bad parameter: {exc}")
            return 2
        camera.prepare()
        state["interrupt"] = False
        if state["stop"]:
            return 0
        camera.start()
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(camera.node)
        while not state["stop"] and not camera.done and context.ok():
            executor.spin_once(timeout_sec=SPIN_TIMEOUT_S)
        if camera.done:
            camera.flush()
            camera.logger.info(f"published {camera.published} frames, exiting")
        return 0
    except _Interrupted:
        return 0
    finally:
        state["interrupt"] = True  # a second signal during teardown ends it quietly
        try:
            if executor is not None:
                executor.shutdown(timeout_sec=1.0)
            if camera is not None:
                camera.destroy()
            if context.ok():
                rclpy.shutdown(context=context)
        except _Interrupted:
            pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
