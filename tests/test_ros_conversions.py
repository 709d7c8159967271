"""im2hands_ros.conversions with real ROS 2 message objects (no mocks, no rclpy context)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("visualization_msgs.msg")

import trimesh  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from geometry_msgs.msg import Point, PoseArray  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2  # noqa: E402
from std_msgs.msg import ColorRGBA, Header  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from im2hands_model.pipeline.result import (  # noqa: E402
    ContactReport,
    HandResult,
    Reconstruction,
)
from im2hands_ros import conversions as conv  # noqa: E402
from im2hands_ros.conversions import ConversionError  # noqa: E402

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, size=(7, 5), dtype=np.uint8)


def _image(encoding: str, pad: int = 0, big_endian: bool = False) -> tuple[Image, np.ndarray]:
    """A message encoding RGB (or GREY for mono) with `pad` bytes of row padding, and the RGB
    image that image_to_rgb must give back."""
    h, w = RGB.shape[:2]
    alpha = np.full((h, w, 1), 77, np.uint8)
    expected = RGB
    if encoding == "rgb8":
        pix = RGB
    elif encoding == "bgr8":
        pix = RGB[..., ::-1]
    elif encoding == "rgba8":
        pix = np.concatenate([RGB, alpha], axis=2)
    elif encoding == "bgra8":
        pix = np.concatenate([RGB[..., ::-1], alpha], axis=2)
    elif encoding == "mono8":
        pix, expected = GREY, np.repeat(GREY[..., None], 3, axis=2)
    elif encoding == "mono16":
        v = GREY.astype(np.uint16) * 257 + 3  # high byte = GREY, low byte noise
        pix = v.astype(">u2" if big_endian else "<u2")
        expected = np.repeat(GREY[..., None], 3, axis=2)
    else:
        raise AssertionError(encoding)
    rows = np.ascontiguousarray(pix).view(np.uint8).reshape(h, -1)
    rows = np.concatenate([rows, np.full((h, pad), 0xAB, np.uint8)], axis=1)
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=int(big_endian))
    msg.step = rows.shape[1]
    msg.data = rows.tobytes()
    return msg, expected


def _header() -> Header:
    return Header(stamp=Time(sec=12, nanosec=345), frame_id="camera_optical")


def _roundtrip(msg):
    """Serialise with rclpy (what publishing does) and read back."""
    data = serialize_message(msg)
    assert isinstance(data, bytes) and len(data) > 0
    back = deserialize_message(data, type(msg))
    assert back == msg
    return back


# ------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
@pytest.mark.parametrize("pad", [0, 3])
def test_image_round_trip(encoding, pad):
    msg, expected = _image(encoding, pad)
    out = conv.image_to_rgb(msg)
    assert out.shape == (7, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    fresh = conv.image_to_rgb(msg, copy=True)
    assert fresh.flags.c_contiguous and fresh.flags.writeable
    np.testing.assert_array_equal(fresh, expected)
    assert not np.shares_memory(fresh, np.frombuffer(msg.data, np.uint8))


def test_mono16_big_endian():
    msg, expected = _image("mono16", pad=2, big_endian=True)
    np.testing.assert_array_equal(conv.image_to_rgb(msg), expected)
    msg.is_bigendian = 0  # the same bytes read little-endian give the noise byte instead
    assert not np.array_equal(conv.image_to_rgb(msg), expected)


def test_rgb8_is_zero_copy():
    msg, _ = _image("rgb8", pad=4)
    out = conv.image_to_rgb(msg)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"encoding": "16UC1"}, "depth image"),
        ({"encoding": "32FC1"}, "depth image"),
        ({"encoding": "yuv411"}, "unsupported image encoding 'yuv411'"),
        ({"encoding": ""}, "unsupported image encoding"),
        ({"step": 14}, "step 14 is smaller than a row"),
        ({"data": bytes(20)}, "data has 20 bytes"),
        ({"height": 0, "width": 0}, "empty image"),
        ({"width": 0}, "empty image"),
    ],
)
def test_image_rejections(edit, match):
    msg, _ = _image("rgb8")
    for k, v in edit.items():
        setattr(msg, k, v)
    with pytest.raises(ConversionError, match=match):
        conv.image_to_rgb(msg)


def test_image_size_limit():
    msg, _ = _image("rgb8")
    with pytest.raises(ConversionError, match="pixels allowed"):
        conv.image_to_rgb(msg, max_pixels=34)
    huge = Image(height=8192, width=8193, encoding="rgb8", step=8193 * 3)  # no data needed
    with pytest.raises(ConversionError, match="pixels allowed"):
        conv.image_to_rgb(huge)
    assert issubclass(ConversionError, ValueError)


def _compressed(fmt: str, pil_format: str, **kw) -> CompressedImage:
    buf = io.BytesIO()
    PILImage.fromarray(RGB).save(buf, format=pil_format, **kw)
    return CompressedImage(header=_header(), format=fmt, data=buf.getvalue())


def test_compressed_png_exact_and_jpeg_close():
    out = conv.compressed_to_rgb(_compressed("png", "PNG"))
    np.testing.assert_array_equal(out, RGB)
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (24, 1, 3))
    buf = io.BytesIO()
    PILImage.fromarray(smooth).save(buf, format="JPEG", quality=95)
    out = conv.compressed_to_rgb(CompressedImage(format="rgb8; jpeg compressed bgr8",
                                                 data=buf.getvalue()))  # fmt: skip
    assert out.shape == smooth.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - smooth).mean() < 3.0


@pytest.mark.parametrize(
    "data, fmt, match",
    [
        (b"", "jpeg", "no data"),
        (b"\x00garbage bytes, not an image" * 10, "jpeg", "cannot decode"),
        (b"\xff\xd8\xff\xe0" + bytes(50), "jpeg", "cannot decode"),  # JPEG magic, then junk
        (None, "png", "cannot decode"),  # truncated PNG
        (b"\x89PNG\r\n\x1a\n", "16UC1; compressedDepth png", "compressed depth"),
    ],
)
def test_compressed_rejections(data, fmt, match):
    if data is None:
        data = _compressed("png", "PNG").data.tobytes()[:60]
    with pytest.raises(ConversionError, match=match):
        conv.compressed_to_rgb(CompressedImage(format=fmt, data=data))


def test_compressed_other_format_and_limit():
    with pytest.raises(ConversionError, match="expected JPEG or PNG"):
        conv.compressed_to_rgb(_compressed("gif", "GIF"))
    with pytest.raises(ConversionError, match="pixels allowed"):
        conv.compressed_to_rgb(_compressed("png", "PNG"), max_pixels=10)


def test_camera_info():
    info = CameraInfo(width=640, height=480)
    info.k = [500.0, 0.0, 320.0, 0.0, 510.0, 240.0, 0.0, 0.0, 1.0]
    K = conv.camera_info_to_K(info)
    assert K.dtype == np.float64 and K.shape == (3, 3)
    np.testing.assert_array_equal(K, [[500, 0, 320], [0, 510, 240], [0, 0, 1]])
    K[0, 0] = 1.0  # a copy, not a view of the message
    assert info.k[0] == 500.0
    bad = {
        "NaN": [np.nan, 0, 320, 0, 510, 240, 0, 0, 1],
        "all zeros": [0.0] * 9,
        "must be positive": [0, 0, 320, 0, 510, 240, 0, 0, 1],
        "fy=-510": [500, 0, 320, 0, -510, 240, 0, 0, 1],
        "last row": [500, 0, 320, 0, 510, 240, 0, 0, 2],
    }
    for match, k in bad.items():
        info.k = [float(v) for v in k]
        with pytest.raises(ConversionError, match=match):
            conv.camera_info_to_K(info)


def test_default_camera_K():
    np.testing.assert_array_equal(
        conv.default_camera_K(640, 480), [[640, 0, 320], [0, 640, 240], [0, 0, 1]]
    )
    np.testing.assert_array_equal(conv.default_camera_K(300, 401)[:2, :2], np.eye(2) * 401)
    with pytest.raises(ConversionError):
        conv.default_camera_K(0, 10)


# ------------------------------------------------------------------------------------------
# builders


def _hand(side: str, mesh, offset) -> HandResult:
    kp = (RNG.normal(size=(21, 3)) * 0.03 + offset).astype(np.float32)
    return HandResult(side=side, mesh=mesh, keypoints=kp, confidence=0.9)


def _reconstruction(left: bool = True, right: bool = True) -> Reconstruction:
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=0.04)
    sphere.apply_translation([-0.05, 0.0, 0.5])
    box = trimesh.creation.box(extents=[0.06, 0.08, 0.03])
    box.apply_translation([0.05, 0.0, 0.5])
    contacts = ContactReport(
        contact_distance=0.005,
        penetrating_points=[RNG.normal(size=(4, 3)), np.zeros((0, 3))],
        depth=[np.array([0.0, 0.002, 0.01, 0.03]), np.zeros(0)],
        touching_points=[RNG.normal(size=(3, 3)), RNG.normal(size=(2, 3))],
        distance=[np.array([0.001, 0.002, 0.003]), np.array([0.004, 0.0])],
    )
    hands = [
        _hand("left", sphere, [-0.05, 0, 0.5]) if left else None,
        _hand("right", box, [0.05, 0, 0.5]) if right else None,
    ]
    return Reconstruction(hands=hands, contacts=contacts, timings_ms={})


def _xyz(points) -> np.ndarray:
    return np.array([[p.x, p.y, p.z] for p in points], dtype=np.float64).reshape(-1, 3)


def test_constants_match_library():
    from im2hands_model.hands import HAND_COLOURS, SKELETON_EDGES

    assert conv.HAND_COLOURS == HAND_COLOURS
    assert conv.BONE_EDGES == SKELETON_EDGES


def test_fast_points_equal_checked_constructor():
    a = RNG.normal(size=(50, 3))
    fast = conv.points_from_array(a)
    assert fast == [Point(x=x, y=y, z=z) for x, y, z in a.tolist()]
    assert all(type(p) is Point for p in fast)
    fast[0].x = 5.0  # the public setters still work on fast objects
    assert fast[0].x == 5.0
    assert conv.points_from_array(np.zeros((0, 3))) == []
    c = conv.colors_from_array(np.array([[0.1, 0.2, 0.3, 0.4]]))
    r, g, b, a = np.float32([0.1, 0.2, 0.3, 0.4]).tolist()  # float32 as on the wire
    assert c == [ColorRGBA(r=r, g=g, b=b, a=a)]


def test_mesh_markers_and_delete():
    rec = _reconstruction()
    header = _header()
    arr = conv.mesh_markers(rec, header)
    assert isinstance(arr, MarkerArray) and len(arr.markers) == 2
    for h, m in enumerate(arr.markers):
        mesh = rec.hands[h].mesh
        assert (m.id, m.ns, m.type, m.action) == (h, "hands", Marker.TRIANGLE_LIST, Marker.ADD)
        assert m.header.frame_id == "camera_optical" and m.header.stamp.nanosec == 345
        assert m.pose.orientation.w == 1.0
        np.testing.assert_allclose(
            [m.color.r, m.color.g, m.color.b], np.float32(conv.HAND_COLOURS[h]) / np.float32(255)
        )
        assert len(m.points) == 3 * len(mesh.faces)
        np.testing.assert_array_equal(_xyz(m.points), mesh.vertices[mesh.faces.reshape(-1)])
    _roundtrip(arr)
    assert conv.mesh_presence(rec) == (True, True)

    # the right hand vanishes: DELETE for id 1 only when it was there before
    gone = _reconstruction(right=False)
    arr = conv.mesh_markers(gone, header, previous_present=conv.mesh_presence(rec))
    assert [(m.id, m.action) for m in arr.markers] == [(0, Marker.ADD), (1, Marker.DELETE)]
    assert arr.markers[1].ns == "hands" and arr.markers[1].header.frame_id == "camera_optical"
    _roundtrip(arr)
    arr = conv.mesh_markers(gone, header, previous_present=(True, False))
    assert [(m.id, m.action) for m in arr.markers] == [(0, Marker.ADD)]
    # a hand whose mesh is None counts as absent
    rec.hands[0].mesh = None
    assert conv.mesh_presence(rec) == (False, True)
    arr = conv.mesh_markers(rec, header, ns="x", colours=((255, 0, 0), (0, 255, 0)))
    assert [(m.id, m.action, m.ns) for m in arr.markers] == [
        (0, Marker.DELETE, "x"),
        (1, Marker.ADD, "x"),
    ]
    assert (arr.markers[1].color.g, arr.markers[1].color.r) == (1.0, 0.0)


def test_mesh_to_msg():
    rec = _reconstruction()
    mesh = rec.hands[1].mesh
    msg = conv.mesh_to_msg(rec.hands[1], _header())
    assert isinstance(msg, PointCloud2)
    assert (msg.height, msg.width, msg.point_step) == (len(mesh.faces), 3, 12)
    assert [f.name for f in msg.fields] == ["x", "y", "z"]
    tris = np.frombuffer(_roundtrip(msg).data, "<f4").reshape(msg.height, 3, 3)
    np.testing.assert_array_equal(tris, mesh.vertices[mesh.faces].astype(np.float32))
    empty = conv.mesh_to_msg(None, _header())
    assert (empty.height, empty.width, len(empty.data)) == (0, 0, 0)
    assert empty.header.frame_id == "camera_optical"
    _roundtrip(empty)


def test_serialized_mesh_cloud_is_mesh_to_msg_on_the_wire():
    """The spliced cloud is what rclpy writes for mesh_to_msg (same length, same message; CDR's
    padding bytes are not defined): a hand, no hand, frame ids of every length modulo 4, and a
    mesh with a non-finite corner (is_dense false)."""
    rec = _reconstruction()
    broken = rec.hands[0].mesh.copy()
    broken.vertices[0] = np.nan
    header = _header()
    for frame_id in ("", "c", "ca", "cam", "camera_optical"):
        header.frame_id = frame_id
        for hand in (rec.hands[1], None, _hand("left", broken, [0, 0, 0.5])):
            data = conv.serialized_mesh_cloud(hand, header)
            want = conv.mesh_to_msg(hand, header)
            assert len(data) == len(serialize_message(want)), frame_id
            assert deserialize_message(data, PointCloud2) == want, frame_id
    got = deserialize_message(data, PointCloud2)
    assert not got.is_dense and got.height == len(broken.faces)


def test_keypoint_markers_and_pose_array():
    rec = _reconstruction(left=False)
    arr = conv.keypoint_markers(rec, _header())
    kinds = [(m.id, m.type, m.action) for m in arr.markers]
    assert kinds == [
        (0, Marker.ARROW, Marker.DELETE),
        (1, Marker.ARROW, Marker.DELETE),
        (2, Marker.SPHERE_LIST, Marker.ADD),
        (3, Marker.LINE_LIST, Marker.ADD),
    ]
    kp = rec.hands[1].keypoints.astype(np.float64)
    np.testing.assert_array_equal(_xyz(arr.markers[2].points), kp)
    bones = _xyz(arr.markers[3].points).reshape(-1, 2, 3)
    assert len(bones) == 20
    np.testing.assert_array_equal(bones[5], kp[[5, 6]])
    _roundtrip(arr)

    poses = conv.keypoints_pose_array(rec.hands[1], _header())
    assert isinstance(poses, PoseArray) and len(poses.poses) == 21
    np.testing.assert_array_equal(_xyz([p.position for p in poses.poses]), kp)
    assert all(p.orientation.w == 1.0 and p.orientation.x == 0.0 for p in poses.poses)
    _roundtrip(poses)
    empty = conv.keypoints_pose_array(None, _header())
    assert len(empty.poses) == 0 and empty.header.frame_id == "camera_optical"
    _roundtrip(empty)


def test_contact_markers():
    c = _reconstruction().contacts
    arr = conv.contact_markers(c, _header())
    assert [(m.id, m.action) for m in arr.markers] == [
        (0, Marker.ADD),
        (1, Marker.ADD),
        (2, Marker.DELETE),  # the right hand has no penetrating points
        (3, Marker.ADD),
    ]
    pen = arr.markers[0]
    assert pen.type == Marker.POINTS and len(pen.colors) == len(pen.points) == 4
    np.testing.assert_array_equal(_xyz(pen.points), c.penetrating_points[0])
    reds = [(col.r, col.g) for col in pen.colors]
    assert all(r == 1.0 for r, _ in reds)
    greens = [g for _, g in reds]
    assert greens == sorted(greens, reverse=True) and greens[-1] == 0.0  # deeper = redder
    touch = arr.markers[3]
    assert (touch.color.r, touch.color.g, touch.color.b) == (1.0, 1.0, 0.0)
    np.testing.assert_array_equal(_xyz(touch.points), c.touching_points[1])
    _roundtrip(arr)
    empty = conv.contact_markers(ContactReport(contact_distance=0.005), _header())
    assert [m.action for m in empty.markers] == [Marker.DELETE] * 4
    _roundtrip(empty)


def test_contacts_cloud_decodes_back():
    c = _reconstruction().contacts
    msg = _roundtrip(conv.contacts_cloud(c, _header()))
    assert msg.header.frame_id == "camera_optical"
    assert [f.name for f in msg.fields] == ["x", "y", "z", "depth", "hand"]
    assert (msg.height, msg.width, msg.point_step) == (1, 4 + 3 + 0 + 2, 20)
    assert msg.row_step == 20 * msg.width and not msg.is_bigendian and msg.is_dense
    rec = np.frombuffer(msg.data, conv.CONTACT_CLOUD_DTYPE)
    # an independent decode from the PointField offsets
    raw = np.frombuffer(msg.data, np.uint8).reshape(msg.width, msg.point_step)
    offs = {f.name: f.offset for f in msg.fields}
    xs = raw[:, offs["x"] : offs["x"] + 4].copy().view("<f4")[:, 0]
    np.testing.assert_array_equal(xs, rec["x"])
    xyz = np.stack([rec["x"], rec["y"], rec["z"]], axis=1)
    expected = np.concatenate(
        [c.penetrating_points[0], c.touching_points[0], c.touching_points[1]]
    ).astype(np.float32)
    np.testing.assert_array_equal(xyz, expected)
    np.testing.assert_array_equal(
        rec["depth"], np.float32([0.0, 0.002, 0.01, 0.03, -0.001, -0.002, -0.003, -0.004, 0.0])
    )
    np.testing.assert_array_equal(rec["hand"], [0] * 7 + [1] * 2)
    empty = conv.contacts_cloud(ContactReport(contact_distance=0.005), _header())
    assert empty.width == 0 and len(empty.data) == 0
    _roundtrip(empty)



def test_serialized_mesh_markers_are_the_mesh_markers_on_the_wire():
    """The spliced bytes deserialise to exactly the MarkerArray that mesh_markers builds (both
    hands, a hand gone with and without its DELETE, no hand, long and odd-length names), and
    subscribers need nothing but the message type."""
    header = _header()
    gone = _reconstruction(right=False)
    nothing = _reconstruction(left=False, right=False)
    cases = [(_reconstruction(), {}), (gone, {"previous_present": (True, True)}),
             (gone, {"previous_present": (True, False)}), (nothing, {}),
             (_reconstruction(), {"ns": "a_longer_namespace", "alpha": 0.5,
                                  "colours": ((255, 0, 0), (0, 255, 0))})]  # fmt: skip
    for frame_id in ("camera_optical", "c", "cam_12345"):
        header.frame_id = frame_id
        for rec, kwargs in cases:
            want = conv.mesh_markers(rec, header, **kwargs)
            data = conv.serialized_mesh_markers(rec, header, **kwargs)
            assert isinstance(data, bytes)
            got = deserialize_message(data, MarkerArray)
            assert got == want, (frame_id, kwargs)
    big = trimesh.creation.icosphere(subdivisions=5, radius=0.05)
    rec = Reconstruction(hands=[_hand("left", big, [0, 0, 0.5]), _hand("right", big, [0, 0, 0.6])],
                         contacts=ContactReport(contact_distance=0.005), timings_ms={})  # fmt: skip
    got = deserialize_message(conv.serialized_mesh_markers(rec, header), MarkerArray)
    assert got == conv.mesh_markers(rec, header) and len(got.markers[1].points) == 61440

def test_timing_60k_vertex_mesh_marker(capsys):
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.05)  # 20,480 faces
    rec = Reconstruction(hands=[None, _hand("right", sphere, [0, 0, 0.5])],
                         contacts=ContactReport(contact_distance=0.005), timings_ms={})  # fmt: skip
    tri = sphere.vertices[sphere.faces.reshape(-1)]
    serialize_message(conv.mesh_markers(_reconstruction(), _header()))  # load the type support
    t0 = time.perf_counter()
    arr = conv.mesh_markers(rec, _header())
    t1 = time.perf_counter()
    naive = [Point(x=x, y=y, z=z) for x, y, z in tri.tolist()]
    t2 = time.perf_counter()
    data = serialize_message(arr)
    t3 = time.perf_counter()
    cloud = conv.mesh_to_msg(rec.hands[1], _header())
    t4 = time.perf_counter()
    spliced = conv.serialized_mesh_markers(rec, _header())
    t5 = time.perf_counter()
    assert len(spliced) == len(data)
    assert arr.markers[1].points == naive
    assert cloud.height == len(sphere.faces)
    with capsys.disabled():
        print(
            f"\n[timing] {len(tri)} triangle-list vertices: mesh_markers {1e3 * (t1 - t0):.1f} ms, "
            f"naive Point list {1e3 * (t2 - t1):.1f} ms, serialize {1e3 * (t3 - t2):.1f} ms "
            f"({len(data) / 1e6:.2f} MB), mesh_to_msg PointCloud2 {1e3 * (t4 - t3):.1f} ms, "
            f"serialized_mesh_markers {1e3 * (t5 - t4):.1f} ms"
        )


def test_keypoints_pose_array_round_trip_and_refusals():
    kp = np.random.default_rng(0).uniform(-0.1, 0.1, (2, 21, 3)) + [0.0, 0.0, 0.6]
    kp[0] = np.nan  # left hand absent
    msg = conv.keypoints_to_pose_array(kp, Header(frame_id="cam"))
    back = conv.keypoints_from_pose_array(  # (NaN != NaN, so not _roundtrip's equality check)
        deserialize_message(serialize_message(msg), PoseArray)
    )
    np.testing.assert_allclose(back, kp, equal_nan=True)
    part = kp.copy()
    part[1, 3] = np.nan
    with pytest.raises(conv.ConversionError, match="partly NaN"):
        conv.keypoints_from_pose_array(conv.keypoints_to_pose_array(part, Header()))
    behind = kp.copy()
    behind[1, :, 2] = -0.5
    with pytest.raises(conv.ConversionError, match="behind the camera"):
        conv.keypoints_from_pose_array(conv.keypoints_to_pose_array(behind, Header()))
    short = conv.keypoints_to_pose_array(kp, Header())
    short.poses = short.poses[:21]
    with pytest.raises(conv.ConversionError, match="42 poses"):
        conv.keypoints_from_pose_array(short)


def test_mesh_cloud_round_trip_is_watertight_and_layout_is_checked():
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.05)
    hand = HandResult("left", sphere, np.zeros((21, 3)), 1.0)
    verts, faces = conv.mesh_from_msg(_roundtrip(conv.mesh_to_msg(hand, Header())))
    back = trimesh.Trimesh(verts, faces)
    assert back.is_watertight and len(back.vertices) == len(sphere.vertices)
    assert abs(back.volume - sphere.volume) < 1e-6
    assert conv.mesh_from_msg(conv.mesh_to_msg(None, Header())) is None
    bad = conv.mesh_to_msg(hand, Header())
    bad.width = 4
    with pytest.raises(conv.ConversionError, match="not an im2hands mesh cloud"):
        conv.mesh_from_msg(bad)


def test_numpy_to_image_and_camera_info():
    rgb = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    for enc in ("rgb8", "bgr8"):
        msg = _roundtrip(conv.rgb_to_image(rgb, Header(frame_id="cam"), enc))
        assert msg.encoding == enc and msg.step == 21
        np.testing.assert_array_equal(conv.image_to_rgb(msg), rgb)
    with pytest.raises(conv.ConversionError, match="uint8"):
        conv.rgb_to_image(rgb.astype(np.float32), Header())
    K = np.array([[500.0, 0, 320], [0, 510, 240], [0, 0, 1]])
    info = _roundtrip(conv.camera_info_from_K(K, 640, 480, Header(frame_id="cam")))
    np.testing.assert_array_equal(conv.camera_info_to_K(info), K)
    assert (info.width, info.height, info.header.frame_id) == (640, 480, "cam")
