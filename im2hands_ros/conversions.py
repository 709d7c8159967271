"""Conversions between ROS 2 messages and numpy, and message builders for reconstruction results.

Everything here is plain data shuffling (no maths), so the node stays a thin shell:

* images in: :func:`image_to_rgb` (raw ``sensor_msgs/Image``: RGB, BGR, mono, and the YUV and
  Bayer encodings of USB and industrial cameras, decoded by OpenCV) and :func:`compressed_to_rgb`
  (``sensor_msgs/CompressedImage``, JPEG/PNG) give uint8 ``[H, W, 3]`` RGB; :func:`camera_info_to_K`
  and :func:`default_camera_K` give ``float64 [3, 3]`` intrinsics. Every bad input raises
  :class:`ConversionError` (a :class:`ValueError`) with a message saying what is wrong.
* results out: RViz markers (:func:`mesh_markers`, :func:`keypoint_markers`,
  :func:`contact_markers`) and machine-friendly messages (:func:`keypoints_pose_array`,
  :func:`contacts_cloud`, :func:`mesh_to_msg`).

Message arrays are filled from numpy. ``PointCloud2`` payloads are written with structured numpy
arrays straight into ``data``. ``Marker.points`` must be a list of ``geometry_msgs/Point`` objects;
they are made by :func:`points_from_array`, which allocates the objects and sets their slots with
C-level ``map`` calls over ``ndarray.tolist()`` columns (no Python bytecode per point) while the
cyclic garbage collector is paused: several times faster than building the points one by one,
whose allocations also trigger full garbage-collector passes over torch's objects
(docs/measurements.md). The node publishes the meshes' markers serialised by
:func:`serialized_mesh_markers`, which splices the points' bytes in with numpy instead (~1 ms
for 60k vertices against ~90 ms for objects and serialisation). :func:`mesh_to_msg` (a
PointCloud2) is the cheap format for programs.

Frames: every result is in the camera frame of the input image (OpenCV optical frame: x right,
y down, z forward, metres), so the builders take the image's ``std_msgs/Header`` (its stamp and
``frame_id``) and copy it into each message.
"""

from __future__ import annotations

import gc
import io
from collections import deque
from collections.abc import Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any

import numpy as np
from geometry_msgs.msg import Point, Pose, PoseArray
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from im2hands_model.hands import HAND_COLOURS as CONTACT_SHEET_COLOURS
from im2hands_model.hands import SKELETON_EDGES
from im2hands_model.pipeline.frame import MAX_PIXELS, InputError, default_intrinsics

if TYPE_CHECKING:
    from im2hands_model.pipeline.result import ContactReport, HandResult, Reconstruction

__all__ = [
    "BONE_EDGES",
    "CONTACT_CLOUD_DTYPE",
    "DEFAULT_MAX_PIXELS",
    "HAND_COLOURS",
    "SUPPORTED_ENCODINGS",
    "ConversionError",
    "camera_info_from_K",
    "camera_info_to_K",
    "colors_from_array",
    "compressed_to_rgb",
    "contact_markers",
    "contacts_cloud",
    "default_camera_K",
    "image_to_rgb",
    "keypoint_markers",
    "keypoints_from_pose_array",
    "keypoints_pose_array",
    "keypoints_to_pose_array",
    "mesh_markers",
    "mesh_presence",
    "mesh_from_msg",
    "mesh_to_msg",
    "points_from_array",
    "rgb_to_image",
    "serialized_mesh_cloud",
    "serialized_mesh_markers",
]

#: Marker colours of the hands (RGB 0..255, left then right), the library's display colours.
HAND_COLOURS: tuple[tuple[int, int, int], tuple[int, int, int]] = CONTACT_SHEET_COLOURS

#: Skeleton bones as (parent, child) joint indices.
BONE_EDGES: tuple[tuple[int, int], ...] = SKELETON_EDGES

#: Largest accepted image (pixels) unless the caller says otherwise: the pipeline's limit.
DEFAULT_MAX_PIXELS = MAX_PIXELS

#: Raw encodings :func:`image_to_rgb` reads, with the bytes per pixel of a row (4:2:0 images,
#: ``nv12`` and ``nv21``, have ``height / 2`` rows of interleaved chroma after the luma rows).
SUPPORTED_ENCODINGS: dict[str, int] = {
    "rgb8": 3,
    "bgr8": 3,
    "rgba8": 4,
    "bgra8": 4,
    "mono8": 1,
    "mono16": 2,
    "yuv422": 2,
    "uyvy": 2,
    "yuv422_yuy2": 2,
    "yuyv": 2,
    "nv12": 1,
    "nv21": 1,
    "bayer_rggb8": 1,
    "bayer_bggr8": 1,
    "bayer_gbrg8": 1,
    "bayer_grbg8": 1,
}
_DEPTH_ENCODINGS = ("16UC1", "32FC1")
#: Encodings decoded by ``cv2.cvtColor``, with the name of the ``cv2`` conversion code. ROS's
#: ``yuv422`` is UYVY (``yuv422_yuy2`` is YUYV); OpenCV's YUV codes are BT.601 limited range, as
#: these cameras send. OpenCV's two-letter Bayer codes are named by the second row's first two
#: pixels (ROS's ``bayer_rggb8``, whose first row is R G, is ``COLOR_BayerBG2RGB``): checked by
#: mosaicking known images in ROS's patterns and decoding them (tests/test_ros_camera_encodings.py).
_CV_CODES: dict[str, str] = {
    "yuv422": "COLOR_YUV2RGB_UYVY",
    "uyvy": "COLOR_YUV2RGB_UYVY",
    "yuv422_yuy2": "COLOR_YUV2RGB_YUY2",
    "yuyv": "COLOR_YUV2RGB_YUY2",
    "nv12": "COLOR_YUV2RGB_NV12",
    "nv21": "COLOR_YUV2RGB_NV21",
    "bayer_rggb8": "COLOR_BayerBG2RGB",
    "bayer_bggr8": "COLOR_BayerRG2RGB",
    "bayer_gbrg8": "COLOR_BayerGR2RGB",
    "bayer_grbg8": "COLOR_BayerGB2RGB",
}
_YUV422 = ("yuv422", "uyvy", "yuv422_yuy2", "yuyv")
_YUV420 = ("nv12", "nv21")

_TOUCH_RGBA = (1.0, 1.0, 0.0, 1.0)  # yellow


class ConversionError(ValueError):
    """A message that cannot be converted (bad encoding, size, layout or contents)."""


# --------------------------------------------------------------------------------------------
# images in


def image_to_rgb(
    msg: Image, *, max_pixels: int = DEFAULT_MAX_PIXELS, copy: bool = False
) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB of a raw ``sensor_msgs/Image``.

    Reads ``rgb8``, ``bgr8``, ``rgba8``, ``bgra8``, ``mono8`` and ``mono16`` (scaled to 8 bits by
    keeping the high byte, ``v >> 8``, honouring ``is_bigendian``) with numpy, and the camera
    encodings with OpenCV: YUV 4:2:2 (``yuv422`` = ``uyvy``, ``yuv422_yuy2`` = ``yuyv``; even
    width), YUV 4:2:0 (``nv12``, ``nv21``: ``height`` luma rows then ``height / 2`` rows of
    interleaved chroma, all ``step`` bytes apart; even width and height) and 8-bit Bayer
    (``bayer_rggb8``, ``bayer_bggr8``, ``bayer_gbrg8``, ``bayer_grbg8``, bilinear demosaicing).
    Any row padding given by ``step`` is skipped.

    Args:
        msg: the image.
        max_pixels: largest accepted ``width * height``.
        copy: return a fresh C-contiguous writable array. Without it the result is, where the
            encoding allows, a view of ``msg.data`` (no copy: possibly read-only, strided or
            reversed along the channels); copy before writing into it or handing it to torch.
            YUV and Bayer images are always decoded into a fresh array.

    Raises:
        ConversionError: depth (``16UC1``, ``32FC1``) or other unsupported encodings, an empty or
            too large image, an odd width (4:2:2, 4:2:0) or height (4:2:0), ``step`` smaller than
            a row, or ``data`` shorter than ``step`` times the number of rows.
    """
    enc = str(msg.encoding)
    if enc in _DEPTH_ENCODINGS:
        raise ConversionError(
            f"encoding {enc!r} is a depth image; the reconstruction needs a colour image "
            f"(one of {', '.join(SUPPORTED_ENCODINGS)})"
        )
    bpp = SUPPORTED_ENCODINGS.get(enc)
    if bpp is None:
        raise ConversionError(
            f"unsupported image encoding {enc!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}"
        )
    h, w = _checked_size(msg, max_pixels)
    if enc in _YUV422 and w % 2:
        raise ConversionError(
            f"{enc} image {w}x{h} has an odd width (two pixels share each U and V sample)"
        )
    if enc in _YUV420 and (w % 2 or h % 2):
        raise ConversionError(
            f"{enc} image {w}x{h} has an odd width or height (each 2x2 block shares one U and "
            "V sample)"
        )
    n_rows = h + h // 2 if enc in _YUV420 else h
    what = "step * height * 3 / 2" if enc in _YUV420 else "step * height"
    rows = _pixel_rows(msg, w * bpp, n_rows, what)
    if enc in _CV_CODES:
        return _cv_to_rgb(rows if bpp == 1 else rows.reshape(n_rows, w, bpp), enc)
    if enc == "mono16":
        dtype = np.dtype(">u2" if msg.is_bigendian else "<u2")
        grey = (rows.view(dtype) >> 8).astype(np.uint8)
        rgb = np.broadcast_to(grey[:, :, None], (h, w, 3))
    elif enc == "mono8":
        rgb = np.broadcast_to(rows[:, :, None], (h, w, 3))
    else:
        pix = rows.reshape(h, w, bpp)
        rgb = pix[:, :, :3] if enc in ("rgb8", "rgba8") else pix[:, :, 2::-1]
    return np.array(rgb, dtype=np.uint8, order="C", copy=True) if copy else rgb


def _checked_size(msg: Image, max_pixels: int) -> tuple[int, int]:
    """``(height, width)`` of an image message that is neither empty nor too large."""
    h, w = int(msg.height), int(msg.width)
    if h <= 0 or w <= 0:
        raise ConversionError(f"empty image ({w}x{h})")
    if h * w > max_pixels:
        raise ConversionError(f"image {w}x{h} has more than the {max_pixels} pixels allowed")
    return h, w


def _pixel_rows(msg: Image, row: int, n_rows: int, what: str) -> np.ndarray:
    """``uint8 [n_rows, row]`` view of ``msg.data`` without the ``step`` padding; ``what`` names
    the size the data must have in the error message."""
    step, n = int(msg.step), len(msg.data)
    if step < row:
        raise ConversionError(
            f"step {step} is smaller than a row of {msg.width} {msg.encoding} pixels ({row} bytes)"
        )
    if n < step * n_rows:
        raise ConversionError(f"data has {n} bytes, expected at least {what} = {step * n_rows}")
    rows = np.frombuffer(msg.data, dtype=np.uint8, count=step * n_rows)
    return rows.reshape(n_rows, step)[:, :row]


def _cv_to_rgb(pixels: np.ndarray, enc: str) -> np.ndarray:
    """Fresh uint8 ``[H, W, 3]`` RGB of a YUV or Bayer image, decoded by ``cv2.cvtColor``.

    ``pixels`` are the image's rows without padding (a strided view of ``msg.data`` is fine:
    OpenCV reads it with its row stride): ``[H, W, 2]`` for 4:2:2, ``[H * 3 / 2, W]`` for 4:2:0,
    ``[H, W]`` for Bayer. Sizes are checked by the caller; any OpenCV error is still a
    :class:`ConversionError`.
    """
    import cv2

    try:
        rgb = cv2.cvtColor(pixels, getattr(cv2, _CV_CODES[enc]))
    except cv2.error as exc:
        raise ConversionError(f"cannot decode {enc} image {pixels.shape}: {exc}") from exc
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def compressed_to_rgb(msg: CompressedImage, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB (a fresh array) of a JPEG or PNG ``sensor_msgs/CompressedImage``.

    The format is detected from the bytes (PIL); ``msg.format`` is only used to reject
    ``compressedDepth`` images early.

    Raises:
        ConversionError: empty, undecodable or truncated data, a compressed depth image, or an
            image larger than ``max_pixels``. No other exception type escapes.
    """
    from PIL import Image as PILImage

    fmt = str(msg.format)
    if "compresseddepth" in fmt.replace(" ", "").lower():
        raise ConversionError(f"format {fmt!r} is a compressed depth image, not a colour image")
    data = bytes(msg.data)
    if not data:
        raise ConversionError("compressed image has no data")
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ConversionError(f"empty compressed image ({w}x{h})")
            if w * h > max_pixels:
                raise ConversionError(
                    f"compressed image {w}x{h} has more than the {max_pixels} pixels allowed"
                )
            if im.format not in ("JPEG", "PNG"):
                raise ConversionError(
                    f"compressed image is {im.format}, expected JPEG or PNG (format {fmt!r})"
                )
            im.load()
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ConversionError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ConversionError(
            f"cannot decode compressed image (format {fmt!r}, {len(data)} bytes): {exc}"
        ) from exc
    return rgb


def camera_info_to_K(msg: CameraInfo) -> np.ndarray:
    """``float64 [3, 3]`` intrinsics from ``CameraInfo.k`` (row-major).

    Raises:
        ConversionError: non-finite values, zero or negative focal lengths (an all-zero ``k``
            means an uncalibrated camera), or a last row that is not ``[0, 0, 1]``.
    """
    k = np.asarray(msg.k, dtype=np.float64)
    if k.size != 9:
        raise ConversionError(f"CameraInfo.k must have 9 values, got {k.size}")
    K = k.reshape(3, 3).copy()
    if not np.isfinite(K).all():
        raise ConversionError("CameraInfo.k contains NaN or infinite values")
    if not np.any(K):
        raise ConversionError("CameraInfo.k is all zeros (uncalibrated camera)")
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise ConversionError(
            f"CameraInfo.k focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}"
        )
    if not np.allclose(K[2], (0.0, 0.0, 1.0)):
        raise ConversionError(f"CameraInfo.k last row must be [0, 0, 1], got {K[2].tolist()}")
    return K


def default_camera_K(width: int, height: int) -> np.ndarray:
    """The intrinsics used until a ``CameraInfo`` arrives: the library's
    :func:`~im2hands_model.pipeline.frame.default_intrinsics` (``fx = fy = max(width, height)``,
    about 53 degrees across the longer side; principal point ``(width / 2, height / 2)``), as
    the CLI uses without calibration.

    Raises:
        ConversionError: a non-positive size.
    """
    try:
        return default_intrinsics(width, height)
    except InputError as exc:
        raise ConversionError(str(exc)) from None


def rgb_to_image(rgb: np.ndarray, header: Header, encoding: str = "rgb8") -> Image:
    """A ``sensor_msgs/Image`` (``rgb8`` or ``bgr8``, no row padding) of a uint8 ``[H, W, 3]``
    RGB array (what cameras and tests publish)."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ConversionError(f"expected uint8 [H, W, 3] RGB, got {arr.dtype} {arr.shape}")
    if encoding not in ("rgb8", "bgr8"):
        raise ConversionError(f"encoding must be rgb8 or bgr8, got {encoding!r}")
    if encoding == "bgr8":
        arr = arr[:, :, ::-1]
    msg = Image()
    msg.header = _header(header)
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = 3 * msg.width
    msg.data = np.ascontiguousarray(arr).tobytes()
    return msg


def depth_to_array(msg: Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A depth ``sensor_msgs/Image`` as numpy: ``16UC1`` -> ``uint16`` millimetres, ``32FC1`` ->
    ``float32`` metres (what the pipeline's ``depth=`` takes; 0 / NaN = no measurement).

    Raises:
        ConversionError: another encoding, an empty or too large image, or too little data.
    """
    enc = str(msg.encoding)
    dtypes = {"16UC1": np.dtype(np.uint16), "32FC1": np.dtype(np.float32)}
    if enc not in dtypes:
        raise ConversionError(f"depth encoding must be 16UC1 (mm) or 32FC1 (m), got {enc!r}")
    h, w = _checked_size(msg, max_pixels)
    dtype = dtypes[enc].newbyteorder(">" if msg.is_bigendian else "<")
    rows = _pixel_rows(msg, w * dtype.itemsize, h, "step * height")
    # an array of its own, in the machine's byte order
    return np.ascontiguousarray(rows).view(dtype).reshape(h, w).astype(dtypes[enc])


def depth_to_image(depth_m: np.ndarray, header: Header, encoding: str = "16UC1") -> Image:
    """A depth ``sensor_msgs/Image`` of ``float [H, W]`` metres: ``16UC1`` (millimetres, rounded;
    0 where there is no measurement) or ``32FC1`` (metres)."""
    arr = np.asarray(depth_m, np.float64)
    if arr.ndim != 2:
        raise ConversionError(f"expected a [H, W] depth image, got shape {arr.shape}")
    valid = np.isfinite(arr) & (arr > 0)
    if encoding == "16UC1":
        data = np.where(valid, np.clip(np.round(arr * 1e3), 0, 65535), 0).astype("<u2")
    elif encoding == "32FC1":
        data = np.where(valid, arr, 0.0).astype("<f4")
    else:
        raise ConversionError(f"depth encoding must be 16UC1 or 32FC1, got {encoding!r}")
    msg = Image()
    msg.header = _header(header)
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = data.itemsize * msg.width
    msg.data = data.tobytes()
    return msg


def camera_info_from_K(K: np.ndarray, width: int, height: int, header: Header) -> CameraInfo:
    """A ``sensor_msgs/CameraInfo`` of an undistorted pinhole camera with intrinsics ``K``
    (``plumb_bob`` with zero distortion, identity ``r``, ``p = [K | 0]``)."""
    K = np.asarray(K, dtype=np.float64).reshape(3, 3)
    msg = CameraInfo()
    msg.header = _header(header)
    msg.width, msg.height = int(width), int(height)
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    msg.k = K.reshape(-1).tolist()
    msg.r = np.eye(3).reshape(-1).tolist()
    msg.p = np.concatenate([K, np.zeros((3, 1))], axis=1).reshape(-1).tolist()
    return msg


# --------------------------------------------------------------------------------------------
# fast message arrays


def _slot_filler(cls: type, fields: Sequence[str]) -> Any:
    """Setters of the generated message slots, or ``None`` if the layout is not the expected one
    (then :func:`_fill` falls back to the public constructor)."""
    try:
        setters = [getattr(cls, "_" + f).__set__ for f in fields]
        check = cls._check_fields.__set__
    except AttributeError:  # pragma: no cover - a rosidl generator with another layout
        return None
    return setters, check


_FILLERS: dict[type, Any] = {
    Point: _slot_filler(Point, ("x", "y", "z")),
    ColorRGBA: _slot_filler(ColorRGBA, ("r", "g", "b", "a")),
}
_FIELDS = {Point: ("x", "y", "z"), ColorRGBA: ("r", "g", "b", "a")}


def _fill(cls: type, arr: np.ndarray) -> list[Any]:
    """``len(arr)`` messages of ``cls`` whose fields are the columns of ``arr``.

    Objects are allocated with ``cls.__new__`` and their slots set with ``map`` over the column
    lists (C loops), bypassing the per-field Python checks of the generated setters; the values are
    Python floats from ``tolist()``, exactly what the checked constructor would store.
    """
    fields = _FIELDS[cls]
    dtype = np.float32 if cls is ColorRGBA else np.float64  # the wire types: exact round trips
    a = np.asarray(arr, dtype=dtype).reshape(-1, len(fields))
    filler = _FILLERS[cls]
    if filler is None:  # pragma: no cover
        return [cls(**dict(zip(fields, v, strict=True))) for v in a.tolist()]
    setters, check = filler
    n = len(a)
    cols = a.T.tolist()
    # Allocating tens of thousands of GC-tracked objects triggers full collections, which cost
    # ~100 ms per 60k objects once torch's ~200k objects are alive: pause the collector (nothing
    # made here forms a cycle).
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        objs = list(map(cls.__new__, repeat(cls, n)))
        for setter, col in zip(setters, cols, strict=True):
            deque(map(setter, objs, col), maxlen=0)
        deque(map(check, objs, repeat(False, n)), maxlen=0)
    finally:
        if paused:
            gc.enable()
    return objs


def points_from_array(xyz: np.ndarray) -> list[Point]:
    """``geometry_msgs/Point`` list from an ``[N, 3]`` array (fast path, see the module doc)."""
    return _fill(Point, xyz)


def colors_from_array(rgba: np.ndarray) -> list[ColorRGBA]:
    """``std_msgs/ColorRGBA`` list from an ``[N, 4]`` array of floats in [0, 1]."""
    return _fill(ColorRGBA, rgba)


def _header(header: Header) -> Header:
    return Header(stamp=header.stamp, frame_id=header.frame_id)


def _rgba(colour: Sequence[float], alpha: float = 1.0) -> ColorRGBA:
    """ColorRGBA from an RGB 0..255 triple (float32 values, as on the wire)."""
    r, g, b, a = np.array([*colour[:3], 255.0 * alpha], np.float32) / np.float32(255.0)
    return ColorRGBA(r=float(r), g=float(g), b=float(b), a=float(a))


def _marker(header: Header, ns: str, mid: int, mtype: int) -> Marker:
    m = Marker()
    m.header = _header(header)
    m.ns = ns
    m.id = mid
    m.type = mtype
    m.action = Marker.ADD
    m.pose.orientation.w = 1.0
    m.scale.x = m.scale.y = m.scale.z = 1.0
    return m


def _delete(header: Header, ns: str, mid: int) -> Marker:
    m = Marker()
    m.header = _header(header)
    m.ns = ns
    m.id = mid
    m.action = Marker.DELETE
    return m


# --------------------------------------------------------------------------------------------
# meshes


def _mesh_arrays(hand: HandResult | None) -> tuple[np.ndarray, np.ndarray] | None:
    """``(vertices [V, 3] float64, faces [F, 3] int64)`` of a hand with a non-empty mesh."""
    if hand is None or hand.mesh is None:
        return None
    faces = np.asarray(hand.mesh.faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        return None
    return np.asarray(hand.mesh.vertices, dtype=np.float64).reshape(-1, 3), faces


def mesh_presence(result: Reconstruction) -> tuple[bool, bool]:
    """Which hands have a mesh marker in :func:`mesh_markers` (pass it back as
    ``previous_present`` with the next frame)."""
    left, right = (_mesh_arrays(h) is not None for h in result.hands)
    return left, right


def mesh_markers(
    result: Reconstruction,
    header: Header,
    ns: str = "hands",
    colours: Sequence[Sequence[float]] = HAND_COLOURS,
    previous_present: tuple[bool, bool] = (True, True),
    alpha: float = 1.0,
) -> MarkerArray:
    """RViz meshes: one ``TRIANGLE_LIST`` marker per hand with a mesh (id 0 left, 1 right).

    Each triangle's three vertices are listed in face order (outward, counter-clockwise), in the
    frame and stamp of ``header``, coloured by ``colours[hand]`` (RGB 0..255). A hand without a
    mesh gets a ``DELETE`` marker if it was present in the previous frame (``previous_present``,
    see :func:`mesh_presence`); the default ``(True, True)`` deletes every absent hand, which is
    always safe.
    """
    out, _ = _mesh_marker_array(result, header, ns, colours, previous_present, alpha, False)
    return out


def _mesh_marker_array(result: Reconstruction, header: Header, ns: str,
                       colours: Sequence[Sequence[float]], previous_present: tuple[bool, bool],
                       alpha: float, stand_in: bool,
                       ) -> tuple[MarkerArray, list[tuple[np.ndarray, np.ndarray]]]:  # fmt: skip
    """:func:`mesh_markers`' array and each mesh's ``(stand-in point, triangle-list points)``;
    with ``stand_in`` the markers hold the stand-in instead of their points
    (:func:`serialized_mesh_markers` splices the points in after serialising)."""
    out = MarkerArray()
    points: list[tuple[np.ndarray, np.ndarray]] = []
    for h, hand in enumerate(result.hands):
        arrays = _mesh_arrays(hand)
        if arrays is None:
            if previous_present[h]:
                out.markers.append(_delete(header, ns, h))
            continue
        verts, faces = arrays
        xyz = verts[faces.reshape(-1)]
        m = _marker(header, ns, h, Marker.TRIANGLE_LIST)
        m.color = _rgba(colours[h], alpha)
        m.points = points_from_array(_SENTINELS[h][None] if stand_in else xyz)
        out.markers.append(m)
        points.append((_SENTINELS[h], xyz))
    return out, points


#: Stand-in points whose serialised bytes :func:`serialized_mesh_markers` finds and replaces
#: (values no mesh has, one per hand).
_SENTINELS = (np.array([1.2345678901e-300, -9.87654321e299, 3.1415926535e-299]),
              np.array([-2.7182818284e-300, 1.6180339887e299, -1.4142135623e-299]))  # fmt: skip


def serialized_mesh_markers(
    result: Reconstruction,
    header: Header,
    ns: str = "hands",
    colours: Sequence[Sequence[float]] = HAND_COLOURS,
    previous_present: tuple[bool, bool] = (True, True),
    alpha: float = 1.0,
) -> bytes:
    """:func:`mesh_markers` as the serialised ``MarkerArray`` (CDR bytes), for
    ``Publisher.publish``: the same message on the wire, without a Python object per vertex.

    The array is serialised by rclpy with one stand-in point per mesh, and each stand-in's 24
    bytes (and its count before them) are replaced by the mesh's float64 points. A ``Point`` is
    three 8-byte doubles, so the points end on the same 8-byte alignment whatever their number,
    and every field after them keeps its place relative to the alignment: the spliced bytes are
    the message rclpy would have written (padding bytes aside; checked in the tests). Why:
    building and serialising 60k ``Point`` objects costs ~90 ms per frame on a 2-core CPU, more
    than a re-posed frame's whole budget at camera rate.
    """
    from rclpy.serialization import serialize_message

    out, points = _mesh_marker_array(result, header, ns, colours, previous_present, alpha, True)
    data = serialize_message(out)
    if data[1] != 1:  # encapsulation CDR_LE (0x0001); the splice writes little-endian
        raise RuntimeError(f"unexpected CDR encapsulation {data[:2].hex()}")
    for sentinel, xyz in points:
        key = sentinel.astype("<f8").tobytes()
        at = data.find(key)
        if at < 4 or data.find(key, at + 1) != -1:
            raise RuntimeError("stand-in point not found once in the serialised markers")
        count = data.rfind(np.uint32(1).astype("<u4").tobytes(), 0, at)
        if count < at - 8:  # the count sits right before the points (4 bytes of padding at most)
            raise RuntimeError("points count not found before the stand-in point")
        body = np.ascontiguousarray(xyz, dtype="<f8").tobytes()
        data = (data[:count] + np.uint32(len(xyz)).astype("<u4").tobytes()
                + data[count + 4 : at] + body + data[at + 24 :])  # fmt: skip
    return data


def mesh_to_msg(hand: HandResult | None, header: Header) -> PointCloud2:
    """A stamped, machine-friendly mesh of one hand: a ``sensor_msgs/PointCloud2`` triangle soup.

    Layout: ``height`` = number of triangles, ``width`` = 3, fields ``x, y, z`` (float32,
    little-endian, 12 bytes per point); row ``i`` holds the three corners of triangle ``i`` in
    outward (counter-clockwise) order. Decode with
    ``np.frombuffer(msg.data, "<f4").reshape(msg.height, 3, 3)``; shared vertices can be merged
    back with ``np.unique(..., axis=0, return_inverse=True)``. An absent hand (or no mesh) gives an
    empty cloud (``height = width = 0``) with the same header and fields.

    Why: ``shape_msgs/Mesh`` has no header (no stamp, no frame), a ``Marker`` needs one Python
    object per vertex on both ends (~20-80 ms per 60k vertices), and an indexed pair of messages
    would need synchronising. A PointCloud2 is standard, stamped, one message, built and read with
    numpy only, and RViz can still show it as points.
    """
    return _mesh_cloud(_mesh_triangles(hand), header)


def serialized_mesh_cloud(hand: HandResult | None, header: Header) -> bytes:
    """:func:`mesh_to_msg` as the serialised ``PointCloud2`` (CDR bytes), for
    ``Publisher.publish``: the same message on the wire, written without rclpy converting the
    triangle bytes into a ``uint8[]`` field and back (a few ms per hand and frame).

    The cloud is serialised with empty ``data``, which leaves its length (a ``uint32``, 0) and
    ``is_dense`` (one byte) as the last five bytes; the length and the triangle bytes go in
    between. A byte array needs no alignment, and nothing but ``is_dense`` follows it.
    """
    from rclpy.serialization import serialize_message

    tris = _mesh_triangles(hand)
    data = serialize_message(_mesh_cloud(tris, header, with_data=False))
    if data[1] != 1 or data[-5:-1] != bytes(4):  # CDR_LE (0x0001), then data's length 0
        raise RuntimeError(f"unexpected serialised PointCloud2 ({data[:2].hex()}, "
                           f"{data[-5:].hex()})")  # fmt: skip
    body = np.ascontiguousarray(tris, dtype="<f4").tobytes()
    return data[:-5] + np.uint32(len(body)).astype("<u4").tobytes() + body + data[-1:]


def _mesh_triangles(hand: HandResult | None) -> np.ndarray:
    """``float32 [F, 3, 3]`` corners of a hand's triangles (``[0, 3, 3]`` for no mesh)."""
    arrays = _mesh_arrays(hand)
    if arrays is None:
        return np.zeros((0, 3, 3), np.float32)
    return arrays[0][arrays[1]].astype("<f4", copy=False)


def _mesh_cloud(tris: np.ndarray, header: Header, with_data: bool = True) -> PointCloud2:
    msg = PointCloud2()
    msg.header = _header(header)
    msg.height = len(tris)
    msg.width = 3 if len(tris) else 0
    msg.fields = [
        PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
        for i, n in enumerate("xyz")
    ]
    msg.is_bigendian = False
    msg.point_step = 12
    msg.row_step = 12 * msg.width
    msg.is_dense = bool(np.isfinite(tris).all())
    if with_data:
        msg.data = np.ascontiguousarray(tris, dtype="<f4").tobytes()
    return msg


def mesh_from_msg(msg: PointCloud2) -> tuple[np.ndarray, np.ndarray] | None:
    """``(vertices [V, 3] float64, faces [F, 3] int64)`` of a :func:`mesh_to_msg` cloud, shared
    corners merged (exact float32 equality); ``None`` for an empty cloud (absent hand).

    Raises:
        ConversionError: a cloud not in the triangle-soup layout.
    """
    if msg.height == 0 or msg.width == 0:
        return None
    if msg.width != 3 or msg.point_step != 12 or msg.is_bigendian:
        raise ConversionError(
            "not an im2hands mesh cloud (expected width 3, point_step 12, little-endian)"
        )
    n = int(msg.height)
    if len(msg.data) < 36 * n:
        raise ConversionError(f"mesh cloud data has {len(msg.data)} bytes, expected {36 * n}")
    corners = np.frombuffer(bytes(msg.data), "<f4", count=9 * n).reshape(-1, 3)
    verts, inverse = np.unique(corners, axis=0, return_inverse=True)
    return verts.astype(np.float64), inverse.reshape(-1, 3).astype(np.int64)


# --------------------------------------------------------------------------------------------
# keypoints


def keypoint_markers(
    result: Reconstruction,
    header: Header,
    ns: str = "keypoints",
    colours: Sequence[Sequence[float]] = HAND_COLOURS,
    joint_diameter: float = 0.01,
    bone_width: float = 0.004,
) -> MarkerArray:
    """RViz skeletons: per hand a ``SPHERE_LIST`` of the 21 joints (id ``2 * hand``) and a
    ``LINE_LIST`` of the 20 bones (id ``2 * hand + 1``); absent hands get ``DELETE`` markers for
    both ids (stateless; deleting a marker RViz does not have is harmless)."""
    out = MarkerArray()
    edges = np.asarray(BONE_EDGES, dtype=np.int64).reshape(-1)
    for h, hand in enumerate(result.hands):
        if hand is None:
            out.markers.extend([_delete(header, ns, 2 * h), _delete(header, ns, 2 * h + 1)])
            continue
        joints = np.asarray(hand.keypoints, dtype=np.float64).reshape(21, 3)
        colour = _rgba(colours[h])
        spheres = _marker(header, ns, 2 * h, Marker.SPHERE_LIST)
        spheres.scale.x = spheres.scale.y = spheres.scale.z = float(joint_diameter)
        spheres.color = colour
        spheres.points = points_from_array(joints)
        bones = _marker(header, ns, 2 * h + 1, Marker.LINE_LIST)
        bones.scale.x = float(bone_width)
        bones.scale.y = bones.scale.z = 0.0
        bones.color = colour
        bones.points = points_from_array(joints[edges])
        out.markers.extend([spheres, bones])
    return out


def keypoints_pose_array(hand: HandResult | None, header: Header) -> PoseArray:
    """The 21 joints of one hand as a ``geometry_msgs/PoseArray`` (identity orientations, joint
    order of ``im2hands_model.hands.JOINT_NAMES``); no poses when the hand is absent."""
    msg = PoseArray()
    msg.header = _header(header)
    if hand is None:
        return msg
    msg.poses = _poses(np.asarray(hand.keypoints, dtype=np.float64).reshape(21, 3))
    return msg


def _poses(xyz: np.ndarray) -> list[Pose]:
    """Poses at ``xyz [N, 3]`` with identity orientations (tens of objects: the Pose wrapper is
    not worth a fast path)."""
    poses = []
    for p in points_from_array(xyz):
        pose = Pose()
        pose.position = p
        pose.orientation.w = 1.0
        poses.append(pose)
    return poses


def keypoints_to_pose_array(keypoints: np.ndarray, header: Header) -> PoseArray:
    """Both hands' keypoints in one ``geometry_msgs/PoseArray`` of 42 poses: left joints 0-20,
    right joints 21-41, camera frame, metres, identity orientations; an absent hand has NaN
    positions. This is the node's external ``keypoints`` input format (see
    :func:`keypoints_from_pose_array`)."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape != (2, 21, 3):
        raise ConversionError(f"keypoints must be [2, 21, 3], got {kp.shape}")
    msg = PoseArray()
    msg.header = _header(header)
    msg.poses = _poses(kp.reshape(42, 3))
    return msg


def keypoints_from_pose_array(msg: PoseArray) -> np.ndarray:
    """``float64 [2, 21, 3]`` keypoints (NaN rows for an absent hand) from the 42-pose format of
    :func:`keypoints_to_pose_array`.

    Raises:
        ConversionError: not 42 poses, a hand with some but not all joints finite, or a present
            hand with a joint at or behind the camera (z <= 0).
    """
    n = len(msg.poses)
    if n != 42:
        raise ConversionError(
            f"keypoints PoseArray must hold 42 poses (left 0-20, right 21-41), got {n}"
        )
    kp = np.array(
        [(p.position.x, p.position.y, p.position.z) for p in msg.poses], dtype=np.float64
    ).reshape(2, 21, 3)
    finite = np.isfinite(kp).all(axis=2)
    for h, name in enumerate(("left", "right")):
        if finite[h].any() and not finite[h].all():
            raise ConversionError(f"{name} hand keypoints are partly NaN (all or none)")
        if finite[h].all() and not (kp[h, :, 2] > 0).all():
            raise ConversionError(f"{name} hand has keypoints at or behind the camera (z <= 0)")
    kp[~finite.all(axis=1)] = np.nan
    return kp


# --------------------------------------------------------------------------------------------
# contacts


def _contact_arrays(contacts: ContactReport) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``xyz [N, 3]``, signed ``depth [N]`` (positive inside the other hand, minus the distance
    for touching points) and ``hand [N]`` of all contact points: per hand, penetrating then
    touching."""
    xyz, depth, hand = [], [], []
    for h in range(2):
        pen = np.asarray(contacts.penetrating_points[h], np.float64).reshape(-1, 3)
        touch = np.asarray(contacts.touching_points[h], np.float64).reshape(-1, 3)
        xyz += [pen, touch]
        depth += [
            np.asarray(contacts.depth[h], np.float64).reshape(-1),
            -np.asarray(contacts.distance[h], np.float64).reshape(-1),
        ]
        hand.append(np.full(len(pen) + len(touch), h, np.uint8))
    return np.concatenate(xyz), np.concatenate(depth), np.concatenate(hand)


def contact_markers(
    contacts: ContactReport,
    header: Header,
    ns: str = "contacts",
    point_size: float = 0.004,
    full_red_depth: float = 0.01,
) -> MarkerArray:
    """RViz contacts: per hand ``h`` a ``POINTS`` marker of its penetrating vertices (id ``2h``)
    coloured per point on a red scale by depth (pale red at 0, pure red at ``full_red_depth``
    metres and deeper), and one of its touching vertices (id ``2h + 1``) in yellow. An empty set
    gives a ``DELETE`` marker for its id, so stale points vanish."""
    out = MarkerArray()
    for h in range(2):
        pen = np.asarray(contacts.penetrating_points[h], np.float64).reshape(-1, 3)
        touch = np.asarray(contacts.touching_points[h], np.float64).reshape(-1, 3)
        if len(pen):
            depth = np.asarray(contacts.depth[h], np.float64).reshape(-1)
            t = np.clip(depth / max(full_red_depth, 1e-12), 0.0, 1.0)
            pale = 0.7 * (1.0 - t)
            rgba = np.stack([np.ones_like(t), pale, pale, np.ones_like(t)], axis=1)
            m = _marker(header, ns, 2 * h, Marker.POINTS)
            m.scale.x = m.scale.y = float(point_size)
            m.scale.z = 0.0
            m.color = ColorRGBA(r=1.0, g=0.0, b=0.0, a=1.0)
            m.points = points_from_array(pen)
            m.colors = colors_from_array(rgba)
            out.markers.append(m)
        else:
            out.markers.append(_delete(header, ns, 2 * h))
        if len(touch):
            m = _marker(header, ns, 2 * h + 1, Marker.POINTS)
            m.scale.x = m.scale.y = float(point_size)
            m.scale.z = 0.0
            m.color = ColorRGBA(r=_TOUCH_RGBA[0], g=_TOUCH_RGBA[1], b=_TOUCH_RGBA[2], a=1.0)
            m.points = points_from_array(touch)
            out.markers.append(m)
        else:
            out.markers.append(_delete(header, ns, 2 * h + 1))
    return out


#: Point layout of :func:`contacts_cloud` (little-endian, 20 bytes with 3 bytes of padding).
CONTACT_CLOUD_DTYPE = np.dtype(
    {
        "names": ["x", "y", "z", "depth", "hand"],
        "formats": ["<f4", "<f4", "<f4", "<f4", "u1"],
        "offsets": [0, 4, 8, 12, 16],
        "itemsize": 20,
    }
)


def contacts_cloud(contacts: ContactReport, header: Header) -> PointCloud2:
    """All contact points as an unorganised ``sensor_msgs/PointCloud2``.

    Fields: ``x, y, z`` (float32, metres), ``depth`` (float32: penetration depth, positive, for
    points inside the other hand; minus the distance to it for touching points) and ``hand``
    (uint8: 0 left, 1 right, the hand whose vertex it is); ``point_step`` 20 (3 bytes padding),
    little-endian. Decode with ``np.frombuffer(msg.data, CONTACT_CLOUD_DTYPE)``.
    """
    xyz, depth, hand = _contact_arrays(contacts)
    rec = np.zeros(len(xyz), CONTACT_CLOUD_DTYPE)
    rec["x"], rec["y"], rec["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    rec["depth"] = depth
    rec["hand"] = hand
    msg = PointCloud2()
    msg.header = _header(header)
    msg.height = 1
    msg.width = len(rec)
    msg.fields = [
        PointField(name=name, offset=CONTACT_CLOUD_DTYPE.fields[name][1], datatype=dt, count=1)
        for name, dt in (
            ("x", PointField.FLOAT32),
            ("y", PointField.FLOAT32),
            ("z", PointField.FLOAT32),
            ("depth", PointField.FLOAT32),
            ("hand", PointField.UINT8),
        )
    ]
    msg.is_bigendian = False
    msg.point_step = CONTACT_CLOUD_DTYPE.itemsize
    msg.row_step = msg.point_step * msg.width
    msg.is_dense = bool(np.isfinite(xyz).all() and np.isfinite(depth).all())
    msg.data = rec.tobytes()
    return msg
