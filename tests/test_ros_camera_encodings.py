"""Camera encodings in, and a clean stop of the node.

* ``image_to_rgb`` on the YUV and Bayer encodings of USB and industrial cameras: a real photo
  (``tests/data/handSrc.jpg``) is encoded here with numpy (YUV by the BT.601 limited-range
  formulas, chroma averaged over the pixels that share it; Bayer by keeping, at each site, the
  channel the ROS pattern names), put in real ``sensor_msgs/Image`` messages (with and without
  row padding, serialised by rclpy as publishing does) and decoded back. The tolerances are
  checked to fail for the wrong decoding (swapped U/V or byte order, another Bayer pattern).
* The real ``im2hands-node`` process stopped by SIGINT or SIGTERM while a frame is being
  reconstructed: exit code 0, nothing like a traceback in its output.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("cv2")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseArray  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from ros_helpers import Listener, spawn, wait_for  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from im2hands_ros import conversions as conv  # noqa: E402
from im2hands_ros.conversions import ConversionError  # noqa: E402
from im2hands_ros.worker import Job, LatestFrameWorker  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
PHOTO = np.asarray(PILImage.open(DATA / "handSrc.jpg").convert("RGB"))  # 480 x 640, colourful

YUV422 = ("yuv422", "uyvy", "yuv422_yuy2", "yuyv")
YUV420 = ("nv12", "nv21")
BAYER = ("bayer_rggb8", "bayer_bggr8", "bayer_gbrg8", "bayer_grbg8")
CAMERA_ENCODINGS = YUV422 + YUV420 + BAYER


# ------------------------------------------------------------------------------------------
# encoders (numpy, independent of OpenCV)


def _yuv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT.601 limited-range Y, U (Cb), V (Cr) planes (float) of an RGB image."""
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    return y, u, v


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _encode(rgb: np.ndarray, enc: str) -> np.ndarray:
    """The unpadded rows (``uint8 [rows, bytes per row]``) of ``rgb`` in ROS encoding ``enc``."""
    h, w = rgb.shape[:2]
    if enc in BAYER:
        pattern = enc[len("bayer_") : len("bayer_") + 4]  # sites (0,0), (0,1), (1,0), (1,1)
        mosaic = np.empty((h, w), np.uint8)
        for i, colour in enumerate(pattern):
            dy, dx = divmod(i, 2)
            mosaic[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(colour)]
        return mosaic
    y, u, v = _yuv(rgb)
    if enc in YUV422:  # U and V averaged over each horizontal pixel pair
        u2, v2 = (c.reshape(h, w // 2, 2).mean(axis=2) for c in (u, v))
        y0, y1 = y[:, 0::2], y[:, 1::2]
        order = (u2, y0, v2, y1) if enc in ("yuv422", "uyvy") else (y0, u2, y1, v2)
        return _u8(np.stack(order, axis=-1)).reshape(h, 2 * w)
    # 4:2:0 semi-planar: the luma plane, then interleaved chroma averaged over 2x2 blocks
    u4, v4 = (c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (u, v))
    chroma = (u4, v4) if enc == "nv12" else (v4, u4)
    return np.concatenate([_u8(y), _u8(np.stack(chroma, axis=-1)).reshape(h // 2, w)])


def _message(rows: np.ndarray, enc: str, width: int, height: int, pad: int = 0) -> Image:
    """A real ``sensor_msgs/Image`` of ``rows`` with ``pad`` bytes of junk after each row, after
    a round trip through rclpy's serialisation (what a subscriber receives)."""
    junk = np.full((rows.shape[0], pad), 0xAB, np.uint8)
    data = np.concatenate([rows, junk], axis=1)
    msg = Image(
        header=Header(frame_id="camera_optical"),
        height=height,
        width=width,
        encoding=enc,
        is_bigendian=0,
        step=data.shape[1],
        data=data.tobytes(),
    )
    return deserialize_message(serialize_message(msg), Image)


def _errors(out: np.ndarray, ref: np.ndarray, enc: str) -> tuple[float, float]:
    """Mean and 99th percentile of the absolute difference (Bayer: 2-pixel border left out,
    where demosaicing has no neighbours on one side)."""
    if enc in BAYER:
        out, ref = out[2:-2, 2:-2], ref[2:-2, 2:-2]
    d = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    return float(d.mean()), float(np.percentile(d, 99))


def _close(out: np.ndarray, ref: np.ndarray, enc: str) -> bool:
    """The decoding is right: measured ~0.3-0.5 mean and 2 p99 (subsampled chroma, bilinear
    demosaicing); a swapped U/V, byte order or Bayer pattern gives ~12-33 mean."""
    mean, p99 = _errors(out, ref, enc)
    return mean < 2.0 and p99 < 10.0


# ------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("enc", CAMERA_ENCODINGS)
def test_camera_encodings_decode_to_the_original(enc, pad):
    rgb = PHOTO
    if enc in BAYER and pad:
        rgb = PHOTO[:479, :637]  # Bayer images may have odd sizes
    h, w = rgb.shape[:2]
    msg = _message(_encode(rgb, enc), enc, w, h, pad)
    assert msg.step == w * conv.SUPPORTED_ENCODINGS[enc] + pad
    out = conv.image_to_rgb(msg)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable
    assert _close(out, rgb, enc), _errors(out, rgb, enc)
    # the low-resolution picture (8x8 block means) matches everywhere, borders included
    blocks = [a[: h // 8 * 8, : w // 8 * 8].reshape(h // 8, 8, w // 8, 8, 3).mean(axis=(1, 3))
              for a in (out, rgb)]  # fmt: skip
    assert np.abs(blocks[0] - blocks[1]).max() < 6.0
    fresh = conv.image_to_rgb(msg, copy=True)
    np.testing.assert_array_equal(fresh, out)
    assert not np.shares_memory(fresh, out)


@pytest.mark.parametrize(
    "enc, wrong",
    [
        ("yuv422", "yuv422_yuy2"),  # UYVY read as YUYV
        ("yuyv", "uyvy"),
        ("nv12", "nv21"),  # U and V swapped
        ("nv21", "nv12"),
        ("bayer_rggb8", "bayer_bggr8"),  # R and B swapped
        ("bayer_rggb8", "bayer_grbg8"),  # shifted by a column
        ("bayer_gbrg8", "bayer_grbg8"),
        ("bayer_bggr8", "bayer_gbrg8"),  # shifted by a row
    ],
)
def test_the_tolerance_catches_a_wrong_decoding(enc, wrong):
    """The same bytes labelled with a sibling encoding decode (same sizes) but fail the check:
    the tolerance of the test above would catch OpenCV codes mixed up in conversions.py."""
    h, w = PHOTO.shape[:2]
    msg = _message(_encode(PHOTO, enc), wrong, w, h)
    out = conv.image_to_rgb(msg)
    mean, _ = _errors(out, PHOTO, enc)
    assert not _close(out, PHOTO, enc) and mean > 8.0, mean


@pytest.mark.parametrize("a, b", [("yuv422", "uyvy"), ("yuv422_yuy2", "yuyv")])
def test_ros_aliases_decode_identically(a, b):
    h, w = PHOTO.shape[:2]
    rows = _encode(PHOTO, a)
    np.testing.assert_array_equal(conv.image_to_rgb(_message(rows, a, w, h)),
                                  conv.image_to_rgb(_message(rows, b, w, h)))  # fmt: skip


def test_tiny_bayer_images_decode():
    for h, w in ((1, 1), (1, 2), (2, 1), (2, 2), (3, 5)):
        rgb = PHOTO[100 : 100 + h, 200 : 200 + w]
        out = conv.image_to_rgb(_message(_encode(rgb, "bayer_rggb8"), "bayer_rggb8", w, h))
        assert out.shape == (h, w, 3) and out.dtype == np.uint8


def _small(enc: str, w: int = 8, h: int = 6, pad: int = 0) -> Image:
    return _message(_encode(PHOTO[:h, :w], enc), enc, w, h, pad)


def _edited(enc: str, **fields) -> Image:
    msg = _small(enc)
    for k, v in fields.items():
        setattr(msg, k, v)
    return msg


@pytest.mark.parametrize(
    "msg, match",
    [
        (_edited("yuv422", width=7, step=14), "yuv422 image 7x6 has an odd width"),
        (_edited("yuyv", width=7, step=14), "odd width"),
        (_edited("nv12", height=5), "nv12 image 8x5 has an odd width or height"),
        (_edited("nv21", width=7, step=7), "odd width or height"),
        (_edited("yuv422", step=15), r"step 15 is smaller than a row of 8 yuv422 pixels \(16"),
        (_edited("nv12", step=7), r"step 7 is smaller than a row of 8 nv12 pixels \(8 bytes\)"),
        (_edited("bayer_rggb8", step=7), "step 7 is smaller than a row"),
        (_edited("yuv422_yuy2", data=bytes(95)), "data has 95 bytes, expected at least step"),
        # the chroma rows are missing: only step * height bytes
        (_edited("nv21", data=bytes(48)), r"has 48 bytes, .* step \* height \* 3 / 2 = 72"),
        (_edited("bayer_gbrg8", data=b""), "data has 0 bytes"),
        (_edited("uyvy", width=0), "empty image"),
        (_edited("bayer_bggr8", height=0), "empty image"),
        (_edited("yuv422", encoding="yuv420"), "unsupported image encoding 'yuv420'"),
        (_edited("bayer_rggb8", encoding="bayer_rggb16"), "unsupported image encoding"),
    ],
)
def test_malformed_camera_images_raise_conversion_error(msg, match):
    with pytest.raises(ConversionError, match=match):
        conv.image_to_rgb(msg)


def test_camera_images_respect_the_pixel_limit():
    with pytest.raises(ConversionError, match="pixels allowed"):
        conv.image_to_rgb(_small("nv12"), max_pixels=47)
    huge = Image(height=8192, width=8194, encoding="yuv422", step=2 * 8194)  # no data needed
    with pytest.raises(ConversionError, match="pixels allowed"):
        conv.image_to_rgb(huge)


def test_random_garbage_never_escapes_as_another_exception():
    rng = np.random.default_rng(3)
    for _ in range(300):
        enc = str(rng.choice(CAMERA_ENCODINGS))
        data = rng.integers(0, 256, int(rng.integers(0, 200)), np.uint8).tobytes()
        msg = Image(height=int(rng.integers(0, 9)), width=int(rng.integers(0, 9)), encoding=enc,
                    step=int(rng.integers(0, 30)), data=data)  # fmt: skip
        try:
            out = conv.image_to_rgb(msg)
        except ConversionError:
            continue
        assert out.shape == (msg.height, msg.width, 3) and out.dtype == np.uint8


# ------------------------------------------------------------------------------------------
# stopping


def test_worker_is_idle_after_an_abandoned_job():
    """A job interrupted by KeyboardInterrupt (the node's second Ctrl-C) leaves the worker idle,
    so the node's final ``wait_idle`` does not hang."""

    def process(job: Job) -> None:
        raise KeyboardInterrupt

    worker = LatestFrameWorker(process, time.monotonic, start=False)
    worker.submit(Job(None, time.monotonic()))
    with pytest.raises(KeyboardInterrupt):
        worker.run()
    assert worker.wait_idle(0.1)
    worker.request_stop()
    assert worker.stopping and worker.stop(0.1)
    worker.submit(Job(None, time.monotonic()))  # refused once stopping
    assert worker.wait_idle(0.1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_node_stops_cleanly_while_reconstructing(tmp_path, sig):
    """Frames (in ``yuv422``, as a USB camera sends them) stream at 30 Hz so the node is always
    reconstructing one; SIGINT or SIGTERM then stops it: the frame in progress finishes, exit code
    0, and no traceback or 'context is invalid' error in its output."""
    from im2hands_model.pipeline.bench import synthetic_frames

    frame = synthetic_frames(1)[0]
    h, w = frame.image.shape[:2]
    rows = _encode(frame.image, "yuv422")
    log = tmp_path / "node.log"
    proc = spawn(["im2hands-node", "--ros-args", "-p", "device:=cpu", "-p", "resolution:=64",
                  "-p", "warmup_frames:=1", "-p", "threads:=1", "-p", "keypoint_source:=topic",
                  "-p", "max_frame_age:=0.0"], log)  # fmt: skip
    try:
        with Listener() as L:
            mesh = L.listen("/hands/mesh", MarkerArray, reliable=True)
            diag = L.listen("/diagnostics", DiagnosticArray)
            image = L.publisher("image", Image, reliable=True, depth=1)
            info = L.publisher("camera_info", CameraInfo, reliable=False, depth=1)
            keypoints = L.publisher("keypoints", PoseArray, reliable=False, depth=1)
            wait_for(lambda: "active: listening" in log.read_text(errors="replace"), 120,
                     "the node to activate", log)  # fmt: skip
            L.wait_matched()
            L.wait_heard(info, conv.camera_info_from_K(frame.K, w, h, Header(frame_id="cam")), diag)

            def send() -> None:
                hdr = Header(stamp=L.node.get_clock().now().to_msg(), frame_id="cam")
                info.publish(conv.camera_info_from_K(frame.K, w, h, hdr))
                keypoints.publish(conv.keypoints_to_pose_array(frame.keypoints, hdr))
                msg = _message(rows, "yuv422", w, h)
                msg.header = hdr
                image.publish(msg)

            t_end = time.monotonic() + 60.0
            while len(mesh) < 3 and time.monotonic() < t_end:  # reconstructing, back to back
                send()
                time.sleep(1 / 30)
            assert len(mesh) >= 3, log.read_text(errors="replace")[-3000:]
            for _ in range(4):  # a new frame is in progress now, and one waits in the slot
                send()
                time.sleep(1 / 30)
            proc.send_signal(sig)
            t_sig = time.monotonic()
            rc = proc.wait(20)
            stop_s = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert "finishing the frame in progress" in text, text[-3000:]  # it was mid-frame
    for bad in ("Traceback", "context is invalid", "Failed to publish", "[ERROR]", "[FATAL]"):
        assert bad not in text, text[-3000:]
    assert stop_s < 10.0, stop_s
