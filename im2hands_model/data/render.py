"""Headless OpenGL rendering of coloured triangle meshes (moderngl + EGL, Mesa llvmpipe on CPU).

Used by the synthetic two-hand data generator (SPEC §4.1) to make RGB images, exact per-pixel
mesh-id masks and metric depth maps of posed hand meshes seen through a pinhole camera.

Conventions
-----------
* Geometry is given in the OpenCV camera optical frame: x right, y down, z forward, metres.
* ``K`` is the 3×3 pinhole matrix ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]`` (skew ``s`` usually 0).
  A point projects to ``u = (fx*x + s*y)/z + cx``, ``v = fy*y/z + cy`` (:func:`project_points`).
* Pixel grid: the image spans ``u ∈ [0, W]``, ``v ∈ [0, H]``; pixel ``(row r, column c)`` is the
  square ``[c, c+1) × [r, r+1)`` whose centre is ``(c + 0.5, r + 0.5)``. A projected point lands in
  ``image[floor(v), floor(u)]``. Output arrays are row 0 = top (``v`` grows downwards), exactly
  like images indexed with keypoints projected by ``K``. A pixel is covered by a triangle iff its
  centre is (OpenGL rasterisation rule), and depth / id are sampled at the pixel centre.
  (Some code uses "pixel centres at integers" instead; convert with ``cx_that = cx_this - 0.5``.)
  In this convention a crop at pixel offset ``(x0, y0)`` resized by ``s`` is exactly
  ``fx' = s*fx, cx' = s*(cx - x0)`` (same for y), with no half-pixel terms.
* ``depth`` is the camera-frame z (not the ray length) in metres, float32, and **0.0 where no
  mesh is**.
* ``mask`` is int32 with -1 for background and the index of the mesh in the input list elsewhere.
  It comes from a separate non-multisampled pass, so it is exact even when the RGB image is
  anti-aliased (a pixel's id is that of the surface under the pixel centre, as is its depth).

Set-up: the Debian packages ``libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri`` provide EGL and the
llvmpipe software rasteriser; no display or GPU is needed. Create one :class:`Renderer` per process
(making a context and compiling shaders costs 0.05-0.5 s) and reuse it for every frame.

Multiprocessing: EGL/Mesa contexts do not survive ``fork``. A forked child of a process that has
ever created a Renderer hangs when it creates or uses a context, so this module refuses with a
``RuntimeError`` there instead. Use the ``spawn`` (or ``forkserver``) start method, or create
renderers only in the children of a parent that never created one. llvmpipe uses one rasteriser
thread per core by default; with several worker processes set ``LP_NUM_THREADS=1`` (environment
variable, before the first Renderer) to avoid over-subscription.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from im2hands_model.geometry import project_points  # noqa: F401 (re-exported: the renderer's rule)

APT_PACKAGES = "libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri"
INSTALL_HINT = (
    f"Install EGL and Mesa (software rendering, no GPU or display needed) with "
    f"`sudo apt-get install -y {APT_PACKAGES}` or run `make setup`."
)

MAX_LIGHTS = 4
FORK_HINT = (
    "EGL/Mesa contexts do not survive fork(): this process was forked from one that had created "
    "a Renderer, and a new context here would hang. Start workers with the 'spawn' or "
    "'forkserver' multiprocessing start method, or create renderers only after forking."
)
_egl_pid: int | None = None  # pid of the process that created an EGL context (inherited by forks)
DEFAULT_BACKGROUND = (0.5, 0.5, 0.5)


class RenderUnavailableError(RuntimeError):
    """Headless OpenGL (EGL + Mesa) could not be initialised on this machine."""

    def __init__(self, detail: str = "") -> None:
        message = "Headless OpenGL rendering through EGL is unavailable"
        if detail:
            message += f" ({detail})"
        super().__init__(f"{message}. {INSTALL_HINT}")


@dataclass(frozen=True)
class Light:
    """A light in the camera frame.

    ``direction`` is the direction in which the light travels (from the light towards the scene),
    e.g. ``(0, 0, 1)`` is a head-lamp at the camera. If ``position`` is given the light is a point
    light at that camera-frame position (no distance fall-off) and ``direction`` is ignored.
    ``color`` is linear RGB in 0..1, scaled by ``intensity``.
    """

    direction: tuple[float, float, float] = (0.0, 0.0, 1.0)
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    intensity: float = 1.0
    position: tuple[float, float, float] | None = None


DEFAULT_LIGHTS: tuple[Light, ...] = (
    Light(direction=(0.3, 0.5, 1.0), intensity=0.7),
    Light(direction=(-0.6, -0.2, 0.6), color=(0.9, 0.95, 1.0), intensity=0.25),
)


@dataclass
class RenderResult:
    """Output of :meth:`Renderer.render`; all arrays are row 0 = top."""

    rgb: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # int32 [H, W], -1 background, else mesh index
    depth: np.ndarray  # float32 [H, W], camera z in metres, 0.0 background
    K: np.ndarray = field(default_factory=lambda: np.eye(3))  # float64 [3, 3] used


Mesh = Sequence[Any]  # (vertices [V,3], faces [F,3], rgb (3,)[, vertex_colors [V,3]])
LightLike = Light | Mapping[str, Any]


# --------------------------------------------------------------------------------------------------
# numpy helpers
# --------------------------------------------------------------------------------------------------


def projection_matrix(
    K: np.ndarray, width: int, height: int, near: float, far: float
) -> np.ndarray:
    """4×4 OpenGL clip matrix for OpenCV-frame points, so that window coordinates equal (u, v).

    ``x_ndc = 2u/W - 1`` and ``y_ndc = 2v/H - 1`` (no vertical flip): the framebuffer's first row
    (window y in [0, 1)) is therefore image row 0 = top, and ``glReadPixels`` already returns the
    image top-down. Depth maps z ∈ [near, far] to NDC [-1, 1] as in ``glFrustum``.
    """
    K = np.asarray(K, dtype=np.float64)
    fx, s, cx = K[0]
    fy, cy = K[1, 1], K[1, 2]
    P = np.zeros((4, 4), dtype=np.float64)
    P[0, 0] = 2.0 * fx / width
    P[0, 1] = 2.0 * s / width
    P[0, 2] = 2.0 * cx / width - 1.0
    P[1, 1] = 2.0 * fy / height
    P[1, 2] = 2.0 * cy / height - 1.0
    P[2, 2] = (far + near) / (far - near)
    P[2, 3] = -2.0 * far * near / (far - near)
    P[3, 2] = 1.0
    return P


#: Side of the key light's shadow map, texels.
SHADOW_MAP_SIZE = 1024


def _light_space(points: np.ndarray, direction: np.ndarray, softness_m: float
                 ) -> tuple[np.ndarray, float, float]:  # fmt: skip
    """The orthographic camera-frame -> clip matrix of a directional light travelling along
    ``direction`` that sees all ``points``, with the depth bias and penumbra radius in the shadow
    map's units."""
    forward = direction / max(float(np.linalg.norm(direction)), 1e-12)
    helper = np.array([0.0, 1.0, 0.0]) if abs(forward[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    right = np.cross(helper, forward)
    right /= np.linalg.norm(right)
    up = np.cross(forward, right)
    view = np.stack([right, up, forward])
    local = points @ view.T
    lo, hi = local.min(0), local.max(0)
    extent = float((hi[:2] - lo[:2]).max()) * 1.04 + 1e-6
    depth = float(hi[2] - lo[2]) + 1e-6
    centre = 0.5 * (lo[:2] + hi[:2])
    m = np.eye(4)
    m[0, :3], m[0, 3] = 2 * right / extent, -2 * centre[0] / extent
    m[1, :3], m[1, 3] = 2 * up / extent, -2 * centre[1] / extent
    m[2, :3], m[2, 3] = 2 * forward / depth, -2 * lo[2] / depth - 1
    bias = (0.002 + 2.0 * extent / SHADOW_MAP_SIZE) / depth  # surface acne: ~2 texels + 2 mm
    return m, float(bias), float(softness_m / extent)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit per-vertex normals, the area-weighted mean of the incident faces' normals (vectorised).

    Orientation follows the face winding (counter-clockwise seen from outside -> outward normals).
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    tri = v[f]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 × area
    idx = f.reshape(-1)
    n = np.empty_like(v)
    for j in range(3):
        n[:, j] = np.bincount(idx, weights=np.repeat(fn[:, j], 3), minlength=len(v))
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.where(norm > 0, norm, 1.0)


def vertex_color_jitter(
    rng: np.random.Generator, vertices: np.ndarray, strength: float = 0.06, scale: float = 0.03
) -> np.ndarray:
    """Smooth random multiplicative colour variation [V, 3] around 1 for the 4th mesh element.

    A sum of a few random sinusoids of the vertex position (wavelength ~``scale`` metres), e.g.
    blotchy skin / uneven lighting. ``strength`` is the amplitude (0.06 = ±6 %).
    """
    v = np.asarray(vertices, dtype=np.float64)
    n_waves = 6
    dirs = rng.normal(size=(n_waves, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    freq = 2.0 * np.pi / (scale * rng.uniform(0.5, 2.0, size=n_waves))
    phase = rng.uniform(0.0, 2.0 * np.pi, size=n_waves)
    waves = np.sin((v @ dirs.T) * freq + phase)  # [V, n_waves]
    lum = waves @ rng.uniform(0.5, 1.0, size=n_waves) / n_waves * 2.0  # mostly within ±1
    tint = waves @ rng.normal(scale=0.3, size=(n_waves, 3)) / n_waves
    out = 1.0 + strength * (lum[:, None] + tint)
    return np.clip(out, 0.0, 2.0)


def _coerce_light(light: LightLike) -> Light:
    if isinstance(light, Light):
        return light
    return Light(**dict(light))


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear up-sampling of a small planar [C, h, w] grid to float32 [C, height, width].

    Gathers and lerps (no BLAS: OpenBLAS threads thrash on busy small machines).
    """

    def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out, dtype=np.float32) + 0.5) * np.float32((n_in - 1) / n_out)
        i0 = np.minimum(pos.astype(np.int64), max(n_in - 2, 0))
        return i0, np.minimum(i0 + 1, n_in - 1), (pos - i0).astype(np.float32)

    g = grid.astype(np.float32)
    y0, y1, ty = taps(height, g.shape[1])
    rows = g[:, y0] + (g[:, y1] - g[:, y0]) * ty[None, :, None]  # [C, height, w] (small)
    x0, x1, tx = taps(width, g.shape[2])
    left = rows[:, :, x0]
    left += (rows[:, :, x1] - left) * tx
    return left


def random_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random procedural background, uint8 [height, width, 3] (~2-4 ms at 256², ~15 at VGA).

    Kinds: linear gradient, smooth colour blobs, multi-octave value noise, stripes, checkers; often
    with a few flat random ellipses / rectangles on top, a random brightness and pixel noise.
    Computed planar ([3, H, W]; numpy is slow on a trailing axis of 3) and transposed at the end.
    """
    h, w = int(height), int(width)
    scale = float(max(h, w))
    xs = (np.arange(w, dtype=np.float32) + 0.5)[None, :] / scale  # [1, W]
    ys = (np.arange(h, dtype=np.float32) + 0.5)[:, None] / scale  # [H, 1]

    def colour() -> np.ndarray:
        return rng.uniform(0.0, 1.0, size=3).astype(np.float32)

    def blend(t: np.ndarray) -> np.ndarray:
        c0, c1 = colour(), colour()
        out = np.empty((3, h, w), dtype=np.float32)
        for k in range(3):
            np.multiply(t, c1[k] - c0[k], out=out[k])
            out[k] += c0[k]
        return out

    kind = int(rng.integers(0, 5))
    if kind == 0:  # linear gradient between two colours
        a = rng.uniform(0.0, 2.0 * np.pi)
        t = xs * np.float32(math.cos(a)) + ys * np.float32(math.sin(a))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = blend(t)
    elif kind == 1:  # blurred colour blobs: a coarse random colour grid, bilinearly up-sampled
        gh, gw = int(rng.integers(2, 7)), int(rng.integers(2, 7))
        img = _upsample(rng.uniform(0.0, 1.0, size=(3, gh, gw)), h, w)
    elif kind == 2:  # value noise, a few octaves (clutter-like texture) around a base colour
        amp = 0.55 ** np.arange(4)
        grid = np.zeros((3, 24, 24), dtype=np.float32)
        for octave in range(4):  # octaves are summed on a 24² grid, up-sampled once
            g = 3 * 2**octave
            grid += amp[octave] * _upsample(rng.uniform(-1.0, 1.0, size=(3, g, g)), 24, 24)
        img = _upsample(grid * np.float32(0.35 / amp.sum()), h, w)
        img += colour()[:, None, None]
    else:  # stripes (3) or checkers (4) in a rotated frame
        a = rng.uniform(0.0, np.pi)
        ca, sa = np.float32(math.cos(a)), np.float32(math.sin(a))
        period = np.float32(rng.uniform(0.03, 0.25))
        u = (xs * ca + ys * sa) / period
        if kind == 3:
            t = 0.5 + 0.5 * np.sin(np.float32(2.0 * np.pi) * u)
            if rng.random() < 0.6:  # hard-edged stripes
                t = (t > 0.5).astype(np.float32)
        else:
            v = (ys * ca - xs * sa) / period
            t = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
        img = blend(t)

    for _ in range(int(rng.integers(0, 5))):  # flat random ellipses / rectangles (bbox only)
        cx, cy = rng.uniform(0.0, w), rng.uniform(0.0, h)
        rx, ry = rng.uniform(0.03, 0.3, size=2) * scale
        x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, w)
        y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, h)
        if x0 >= x1 or y0 >= y1:
            continue
        c = colour()
        if rng.random() < 0.5:
            dx = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx) / rx
            dy = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy) / ry
            inside = dx**2 + dy**2 < 1.0
            for k in range(3):
                img[k, y0:y1, x0:x1][inside] = c[k]
        else:
            img[:, y0:y1, x0:x1] = c[:, None, None]

    gain = np.float32(255.0 * rng.uniform(0.6, 1.2))  # overall brightness
    sigma = np.float32(255.0 * rng.uniform(0.0, 0.05) * math.sqrt(12.0))  # uniform noise, std
    noise = rng.random(size=img.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= sigma
    img *= gain
    img += noise
    np.clip(img, 0.0, 255.0, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))


# --------------------------------------------------------------------------------------------------
# OpenGL
# --------------------------------------------------------------------------------------------------

# Blinn-Phong with ambient, up to MAX_LIGHTS directional / point lights, gamma-encoded result.
_LIGHTING_GLSL = """
#define MAX_LIGHTS @MAX_LIGHTS@
uniform int u_num_lights;
uniform vec3 u_light_dir[MAX_LIGHTS];   // unit direction towards the light (directional lights)
uniform vec3 u_light_pos[MAX_LIGHTS];   // position (point lights)
uniform vec3 u_light_color[MAX_LIGHTS]; // colour * intensity
uniform int u_light_is_point[MAX_LIGHTS];
uniform vec3 u_ambient;
uniform float u_specular;
uniform float u_shininess;
uniform float u_wrap;  // light wrapping past the terminator: skin's subsurface-like softness
vec3 shade(vec3 p, vec3 n, vec3 albedo, float key_visible) {
    vec3 view = normalize(-p);
    vec3 c = u_ambient * albedo;
    for (int i = 0; i < u_num_lights; ++i) {
        vec3 l = u_light_is_point[i] != 0 ? normalize(u_light_pos[i] - p) : u_light_dir[i];
        float ndl = max((dot(n, l) + u_wrap) / (1.0 + u_wrap), 0.0);
        vec3 hv = normalize(l + view);
        float spec = ndl > 0.0 ? pow(max(dot(n, hv), 0.0), u_shininess) : 0.0;
        float visible = i == 0 ? key_visible : 1.0;  // only the key light casts shadows
        c += visible * u_light_color[i] * (ndl * albedo + u_specular * spec);
    }
    return pow(clamp(c, 0.0, 1.0), vec3(1.0 / 2.2));
}
""".replace("@MAX_LIGHTS@", str(MAX_LIGHTS))

# Soft shadows of the key light: a shadow map seen along the light, read with a 5x5
# percentage-closer filter whose footprint is the penumbra (in the vertex shader: per vertex).
_SHADOW_GLSL = """
uniform int u_shadow_on;
uniform mat4 u_light_mat;         // camera frame -> the shadow map's clip space
uniform sampler2D u_shadow_map;   // depth seen from the key light
uniform float u_shadow_bias;      // in the map's depth units
uniform float u_shadow_radius;    // penumbra radius, in the map's texture coordinates
float key_visibility(vec3 p) {
    if (u_shadow_on == 0) return 1.0;
    vec3 c = (u_light_mat * vec4(p, 1.0)).xyz * 0.5 + 0.5;
    float lit = 0.0;
    for (int j = -2; j <= 2; ++j)
        for (int i = -2; i <= 2; ++i) {
            float d = textureLod(u_shadow_map, c.xy + vec2(i, j) * (0.5 * u_shadow_radius), 0.0).r;
            lit += c.z - u_shadow_bias <= d ? 1.0 : 0.0;
        }
    return lit / 25.0;
}
"""

# Per-vertex (Gouraud) lighting: both sides are lit in the vertex shader and each fragment takes
# the side it sees. About 2x faster than per-pixel lighting on llvmpipe and visually the same for
# dense meshes (a hand crop has triangles of a few pixels).
_VERTEX_LIT_VS = (
    """
#version 330
uniform mat4 u_proj;
in vec3 in_pos;
in vec3 in_normal;
in vec3 in_color;
out vec3 v_front;
out vec3 v_back;
"""
    + _LIGHTING_GLSL
    + _SHADOW_GLSL
    + """
void main() {
    vec3 n = normalize(in_normal);
    float key = key_visibility(in_pos);
    v_front = shade(in_pos, n, in_color, key);
    v_back = shade(in_pos, -n, in_color, key);  // seen from behind (e.g. inside an open wrist)
    gl_Position = u_proj * vec4(in_pos, 1.0);
}
"""
)

_VERTEX_LIT_FS = """
#version 330
in vec3 v_front;
in vec3 v_back;
out vec4 f_color;
void main() {
    f_color = vec4(gl_FrontFacing ? v_front : v_back, 1.0);
}
"""

_PIXEL_LIT_VS = (
    """
#version 330
uniform mat4 u_proj;
in vec3 in_pos;
in vec3 in_normal;
in vec3 in_color;
out vec3 v_pos;
out vec3 v_normal;
out vec3 v_color;
out float v_key;
"""
    + _SHADOW_GLSL
    + """
void main() {
    v_key = key_visibility(in_pos);
    v_pos = in_pos;
    v_normal = in_normal;
    v_color = in_color;
    gl_Position = u_proj * vec4(in_pos, 1.0);
}
"""
)

_PIXEL_LIT_FS = (
    """
#version 330
in vec3 v_pos;
in vec3 v_normal;
in vec3 v_color;
in float v_key;
out vec4 f_color;
"""
    + _LIGHTING_GLSL
    + """
void main() {
    vec3 n = normalize(v_normal);
    if (!gl_FrontFacing) n = -n;  // two-sided: a triangle seen from its back uses -n
    f_color = vec4(shade(v_pos, n, v_color, v_key), 1.0);
}
"""
)

_ID_VS = """
#version 330
uniform mat4 u_proj;
in vec3 in_pos;
out float v_z;
void main() {
    v_z = in_pos.z;
    gl_Position = u_proj * vec4(in_pos, 1.0);
}
"""

_ID_FS = """
#version 330
uniform float u_id;  // mesh index + 1 (0 = background)
in float v_z;
out vec2 f_id_depth;
void main() {
    f_id_depth = vec2(u_id, v_z);
}
"""

_COMPOSITE_VS = """
#version 330
in vec2 in_xy;
void main() {
    gl_Position = vec4(in_xy, 0.0, 1.0);
}
"""

_COMPOSITE_FS = """
#version 330
uniform sampler2D u_scene;   // premultiplied RGBA (alpha = coverage), u_ss x the output size
uniform sampler2D u_bg;      // background image at the output size (row 0 = image top)
uniform int u_ss;            // supersampling factor per axis
uniform int u_use_bg_tex;
uniform vec3 u_bg_color;
out vec4 f_color;
void main() {
    ivec2 p = ivec2(gl_FragCoord.xy);  // window row r is image row r (no vertical flip)
    vec4 acc = vec4(0.0);
    for (int j = 0; j < u_ss; ++j)
        for (int i = 0; i < u_ss; ++i)
            acc += texelFetch(u_scene, p * u_ss + ivec2(i, j), 0);
    acc /= float(u_ss * u_ss);
    vec3 bg = u_use_bg_tex != 0 ? texelFetch(u_bg, p, 0).rgb : u_bg_color;
    f_color = vec4(acc.rgb + (1.0 - acc.a) * bg, 1.0);
}
"""


def _set_uniform(prog: Any, name: str, value: Any) -> None:
    """Set a uniform from a scalar / tuple or raw bytes; a uniform optimised away is ignored."""
    member = prog.get(name, None)
    if member is None:
        return
    if isinstance(value, bytes):
        member.write(value)
    else:
        member.value = value


class _MeshSlot:
    """GPU buffers for one mesh position in the list, grown on demand and reused across frames."""

    def __init__(self, ctx: Any, shade_prog: Any, id_prog: Any) -> None:
        self.ctx = ctx
        self.shade_prog = shade_prog
        self.id_prog = id_prog
        self.vbo: Any = None
        self.ibo: Any = None
        self.shade_vao: Any = None
        self.id_vao: Any = None

    def upload(self, data: np.ndarray, index: np.ndarray) -> None:
        vbytes, ibytes = data.nbytes, index.nbytes
        if self.vbo is None or self.vbo.size < vbytes or self.ibo.size < ibytes:
            self.release()
            self.vbo = self.ctx.buffer(reserve=max(2 * vbytes, 1 << 16), dynamic=True)
            self.ibo = self.ctx.buffer(reserve=max(2 * ibytes, 1 << 16), dynamic=True)
            self.shade_vao = self.ctx.vertex_array(
                self.shade_prog,
                [(self.vbo, "3f 3f 3f", "in_pos", "in_normal", "in_color")],
                index_buffer=self.ibo,
                index_element_size=4,
            )
            self.id_vao = self.ctx.vertex_array(
                self.id_prog,
                [(self.vbo, "3f 24x", "in_pos")],
                index_buffer=self.ibo,
                index_element_size=4,
            )
        self.vbo.write(data)
        self.ibo.write(index)

    def release(self) -> None:
        for obj in (self.shade_vao, self.id_vao, self.vbo, self.ibo):
            if obj is not None:
                obj.release()
        self.vbo = self.ibo = self.shade_vao = self.id_vao = None


class _Targets:
    """Framebuffers for one output size (width, height)."""

    def __init__(self, ctx: Any, width: int, height: int, supersample: int, msaa: int) -> None:
        size = (width, height)
        hi = (width * supersample, height * supersample)
        self.objects: list[Any] = []

        def keep(obj: Any) -> Any:
            self.objects.append(obj)
            return obj

        # Id + depth pass at the output size, never multisampled: RG32F = (mesh index + 1, z).
        self.id_fbo = keep(
            ctx.framebuffer(
                [keep(ctx.renderbuffer(size, components=2, dtype="f4"))],
                keep(ctx.depth_renderbuffer(size)),
            )
        )
        # Shaded scene, premultiplied RGBA over a transparent clear, supersample x the size.
        self.scene_tex = keep(ctx.texture(hi, 4))
        self.scene_fbo = keep(
            ctx.framebuffer(
                [self.scene_tex], None if msaa > 1 else keep(ctx.depth_renderbuffer(hi))
            )
        )
        self.ms_fbo = None
        if msaa > 1:  # drawn multisampled, then resolved into scene_tex
            self.ms_fbo = keep(
                ctx.framebuffer(
                    [keep(ctx.renderbuffer(hi, components=4, samples=msaa))],
                    keep(ctx.depth_renderbuffer(hi, samples=msaa)),
                )
            )
        # Final image: box-filtered scene composited over the background.
        self.bg_tex = keep(ctx.texture(size, 3, alignment=1))
        self.out_fbo = keep(ctx.framebuffer([keep(ctx.renderbuffer(size, components=4))]))

    def release(self) -> None:
        for obj in reversed(self.objects):
            obj.release()
        self.objects.clear()


class Renderer:
    """One headless EGL OpenGL context (create once per process, reuse for every frame).

    ``width``/``height`` are the default image size; :meth:`render` may pass another size per call
    (framebuffers are created lazily per size and cached, at most ``max_cached_sizes``).

    Anti-aliasing of the RGB image (the mask and depth are never anti-aliased):

    * ``supersample`` (default 2): the scene is shaded at ``supersample`` x the resolution and
      box-filtered down (an ordered ``s × s`` grid of samples per pixel). On Mesa llvmpipe it costs
      about the same CPU time as 4x MSAA (~10 ms for a 256² crop of two hands) and also smooths
      shading; ``supersample=1, msaa=4`` is the alternative.
    * ``msaa`` (default 0 = off; llvmpipe supports 4): multisampling with a resolve. Can be combined
      with ``supersample``.

    Both composite the anti-aliased scene over the background at the output resolution, so a
    background image is reproduced exactly where no mesh is.

    ``per_pixel_lighting``: Phong-interpolated (per-pixel) instead of per-vertex lighting; about 2x
    slower on llvmpipe and indistinguishable on dense meshes. ``near``/``far``: clip planes (m).
    """

    def __init__(
        self,
        width: int = 256,
        height: int = 256,
        supersample: int = 2,
        msaa: int = 0,
        per_pixel_lighting: bool = False,
        near: float = 0.05,
        far: float = 5.0,
        max_cached_sizes: int = 4,
    ) -> None:
        self.width = int(width)
        self.height = int(height)
        self.supersample = max(1, int(supersample))
        self.near = float(near)
        self.far = float(far)
        self.max_cached_sizes = max(1, int(max_cached_sizes))
        self.ctx: Any = None
        try:
            import moderngl
        except ImportError as exc:  # pragma: no cover - moderngl is a hard dependency
            raise RenderUnavailableError(f"moderngl is not installed: {exc}") from exc
        global _egl_pid
        if _egl_pid is not None and _egl_pid != os.getpid():
            raise RuntimeError(FORK_HINT)
        try:
            self.ctx = moderngl.create_standalone_context(backend="egl", require=330)
        except Exception as exc:  # glcontext raises plain Exception / OSError
            raise RenderUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        _egl_pid = self._pid = os.getpid()
        ctx = self.ctx
        self.msaa = min(int(msaa), int(ctx.max_samples)) if msaa > 1 else 0
        if per_pixel_lighting:
            self._shade_prog = ctx.program(
                vertex_shader=_PIXEL_LIT_VS, fragment_shader=_PIXEL_LIT_FS
            )
        else:
            self._shade_prog = ctx.program(
                vertex_shader=_VERTEX_LIT_VS, fragment_shader=_VERTEX_LIT_FS
            )
        self._id_prog = ctx.program(vertex_shader=_ID_VS, fragment_shader=_ID_FS)
        self._comp_prog = ctx.program(vertex_shader=_COMPOSITE_VS, fragment_shader=_COMPOSITE_FS)
        _set_uniform(self._comp_prog, "u_scene", 0)
        _set_uniform(self._comp_prog, "u_bg", 1)
        quad = np.array([-1, -1, 1, -1, -1, 1, 1, 1], dtype="f4")
        self._quad_vbo = ctx.buffer(quad.tobytes())
        self._comp_vao = ctx.vertex_array(self._comp_prog, [(self._quad_vbo, "2f", "in_xy")])
        self._slots: list[_MeshSlot] = []
        self._targets: dict[tuple[int, int], _Targets] = {}
        self._shadow_map: Any = None
        self._shadow_fbo: Any = None
        # With the y-down projection, triangles wound counter-clockwise seen from the camera in the
        # OpenCV frame (outward normal towards the camera) appear clockwise in window space.
        ctx.front_face = "cw"
        self.renderer_name = str(ctx.info.get("GL_RENDERER", "?"))

    # -- resources ---------------------------------------------------------------------------------

    def _get_targets(self, width: int, height: int) -> _Targets:
        key = (width, height)
        t = self._targets.pop(key, None)
        if t is None:
            if len(self._targets) >= self.max_cached_sizes:  # evict the least recently used
                self._targets.pop(next(iter(self._targets))).release()
            t = _Targets(self.ctx, width, height, self.supersample, self.msaa)
        self._targets[key] = t  # (re-)insert as most recently used
        return t

    def release(self) -> None:
        """Free all GL objects and the context (the renderer is unusable afterwards)."""
        if self.ctx is None:
            return
        if self._pid != os.getpid():  # inherited through fork: the context is not usable here
            self.ctx = None
            return
        with self.ctx:
            for t in self._targets.values():
                t.release()
            for s in self._slots:
                s.release()
            for obj in (self._shadow_fbo, self._shadow_map):
                if obj is not None:
                    obj.release()
        self._targets.clear()
        self._slots.clear()
        self.ctx.release()
        self.ctx = None

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _shadow_pass(self, light_mat: np.ndarray, counts: list[int]) -> None:
        """Depth of the uploaded meshes seen along the key light, into the shadow map."""
        ctx = self.ctx
        if self._shadow_fbo is None:
            self._shadow_map = ctx.depth_texture((SHADOW_MAP_SIZE, SHADOW_MAP_SIZE))
            self._shadow_map.compare_func = ""  # read depths, not comparisons
            self._shadow_map.filter = (ctx.NEAREST, ctx.NEAREST)
            self._shadow_fbo = ctx.framebuffer(depth_attachment=self._shadow_map)
        ip = self._id_prog
        _set_uniform(ip, "u_proj", light_mat.T.astype("f4").tobytes())
        ctx.enable(ctx.DEPTH_TEST)
        self._shadow_fbo.use()
        self._shadow_fbo.clear(depth=1.0)
        for slot, n in zip(self._slots, counts, strict=False):
            if n:
                slot.id_vao.render(vertices=n)

    # -- rendering ---------------------------------------------------------------------------------

    def render(
        self,
        meshes: Sequence[Mesh],
        K: np.ndarray,
        width: int | None = None,
        height: int | None = None,
        background: None | Sequence[float] | np.ndarray = None,
        lights: Iterable[LightLike] | None = None,
        ambient: float | Sequence[float] = 0.2,
        specular: float = 0.12,
        shininess: float = 24.0,
        wrap: float = 0.0,
        shadows: bool = False,
        shadow_softness_m: float = 0.006,
    ) -> RenderResult:
        """Render ``meshes`` seen through ``K`` into an image of ``width`` × ``height`` pixels.

        ``meshes``: list of ``(vertices [V,3], faces [F,3], rgb (3,) in 0..1)`` tuples, optionally
        with a 4th element ``vertex_colors [V,3]``, in the OpenCV camera frame (metres);
        ``vertex_colors`` multiplies ``rgb`` per vertex (see :func:`vertex_color_jitter`). The
        mesh index in the list is its id in ``mask``. Colours are display (gamma 2.2) values: they
        are linearised for shading and the result is re-encoded, so a surface lit with total
        intensity 1 shows its given colour.

        ``background``: ``None`` (mid grey), an RGB tuple (floats 0..1, or ints 0..255 when any
        value is > 1), or a uint8 [H, W, 3] image (row 0 = top) shown unchanged behind the meshes.
        ``lights``: up to 4 :class:`Light` or dicts of its fields (``None``: ``DEFAULT_LIGHTS``).
        ``ambient`` (scalar or RGB), ``specular`` (strength) and ``shininess`` (Blinn-Phong
        exponent) control the shading; ``wrap`` (0..1) lets diffuse light reach past the
        terminator, the soft look of light scattered under skin. ``shadows``: the first light
        (directional) casts shadows, soft over a penumbra of ``shadow_softness_m`` metres.
        """
        if self.ctx is None:
            raise RuntimeError("Renderer has been released")
        if self._pid != os.getpid():
            raise RuntimeError(FORK_HINT)
        W = self.width if width is None else int(width)
        H = self.height if height is None else int(height)
        K = np.asarray(K, dtype=np.float64).reshape(3, 3)
        ss = self.supersample

        # ---- CPU side: vertex data, matrices, lights, background --------------------------------
        packed: list[tuple[np.ndarray, np.ndarray]] = []
        for mesh in meshes:
            verts = np.asarray(mesh[0], dtype=np.float32).reshape(-1, 3)
            faces = np.asarray(mesh[1]).reshape(-1, 3)
            if len(faces) and (faces.min() < 0 or faces.max() >= len(verts)):
                raise ValueError("face index out of range")
            col = np.broadcast_to(np.asarray(mesh[2], dtype=np.float32).reshape(1, 3), verts.shape)
            if len(mesh) > 3 and mesh[3] is not None:
                col = col * np.asarray(mesh[3], dtype=np.float32).reshape(-1, 3)
            data = np.empty((len(verts), 9), dtype=np.float32)
            data[:, 0:3] = verts
            data[:, 3:6] = vertex_normals(verts, faces)
            data[:, 6:9] = np.clip(col, 0.0, 1.0) ** 2.2  # display colour -> linear reflectance
            packed.append((data, np.ascontiguousarray(faces, dtype=np.int32)))

        K_hi = K.copy()
        K_hi[:2] *= ss  # same image plane on an ss-times finer pixel grid
        proj_hi = projection_matrix(K_hi, W * ss, H * ss, self.near, self.far)
        proj = projection_matrix(K, W, H, self.near, self.far)

        light_list = [_coerce_light(x) for x in (DEFAULT_LIGHTS if lights is None else lights)]
        if len(light_list) > MAX_LIGHTS:
            raise ValueError(f"at most {MAX_LIGHTS} lights are supported")
        ldir = np.zeros((MAX_LIGHTS, 3), "f4")
        lpos = np.zeros((MAX_LIGHTS, 3), "f4")
        lcol = np.zeros((MAX_LIGHTS, 3), "f4")
        lpt = np.zeros(MAX_LIGHTS, "i4")
        for i, light in enumerate(light_list):
            d = -np.asarray(light.direction, dtype=np.float64)  # towards the light
            ldir[i] = d / max(float(np.linalg.norm(d)), 1e-12)
            if light.position is not None:
                lpos[i] = light.position
                lpt[i] = 1
            lcol[i] = np.asarray(light.color, dtype=np.float64) * float(light.intensity)
        amb = np.broadcast_to(np.asarray(ambient, dtype=np.float64), (3,))
        shadow = None
        if shadows and light_list and light_list[0].position is None and packed:
            points = np.concatenate([d[:, :3] for d, _ in packed]).astype(np.float64)
            shadow = _light_space(points, np.asarray(light_list[0].direction, np.float64),
                                  shadow_softness_m)  # fmt: skip

        bg_image: np.ndarray | None = None
        bg_color = DEFAULT_BACKGROUND
        if background is not None:
            arr = np.asarray(background)
            if arr.ndim == 3:
                if arr.shape != (H, W, 3):
                    raise ValueError(f"background must be [{H}, {W}, 3], got {arr.shape}")
                bg_image = np.ascontiguousarray(arr, dtype=np.uint8)
            else:
                c = arr.astype(np.float64).reshape(3)
                bg_color = tuple(c / 255.0) if np.any(c > 1.0) else tuple(c)

        # ---- GL side ----------------------------------------------------------------------------
        ctx = self.ctx
        with ctx:  # make this renderer's context current (several may live in one process)
            targets = self._get_targets(W, H)
            while len(self._slots) < len(packed):
                self._slots.append(_MeshSlot(ctx, self._shade_prog, self._id_prog))
            counts = []
            for slot, (data, index) in zip(self._slots, packed, strict=False):
                if len(index):
                    slot.upload(data, index)
                counts.append(3 * len(index))

            sp = self._shade_prog
            _set_uniform(sp, "u_proj", proj_hi.T.astype("f4").tobytes())  # mat4 is column-major
            _set_uniform(sp, "u_num_lights", len(light_list))
            _set_uniform(sp, "u_light_dir", ldir.tobytes())
            _set_uniform(sp, "u_light_pos", lpos.tobytes())
            _set_uniform(sp, "u_light_color", lcol.tobytes())
            _set_uniform(sp, "u_light_is_point", lpt.tobytes())
            _set_uniform(sp, "u_ambient", tuple(float(a) for a in amb))
            _set_uniform(sp, "u_specular", float(specular))
            _set_uniform(sp, "u_shininess", float(shininess))
            _set_uniform(sp, "u_wrap", float(wrap))
            _set_uniform(sp, "u_shadow_on", int(shadow is not None))
            _set_uniform(sp, "u_shadow_map", 2)  # never unit 0, the scene texture's
            if shadow is not None:
                self._shadow_pass(shadow[0], counts)
                _set_uniform(sp, "u_light_mat", shadow[0].T.astype("f4").tobytes())
                _set_uniform(sp, "u_shadow_bias", shadow[1])
                _set_uniform(sp, "u_shadow_radius", shadow[2])
                self._shadow_map.use(2)

            # Pass 1: shaded scene over transparent black (premultiplied alpha = coverage).
            ctx.enable(ctx.DEPTH_TEST)
            scene_target = targets.ms_fbo if targets.ms_fbo is not None else targets.scene_fbo
            scene_target.use()
            scene_target.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
            for slot, n in zip(self._slots, counts, strict=False):
                if n:
                    slot.shade_vao.render(vertices=n)
            if targets.ms_fbo is not None:
                ctx.copy_framebuffer(targets.scene_fbo, targets.ms_fbo)

            # Pass 2: exact mesh ids and camera z at the output resolution.
            ip = self._id_prog
            _set_uniform(ip, "u_proj", proj.T.astype("f4").tobytes())
            targets.id_fbo.use()
            targets.id_fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
            for i, (slot, n) in enumerate(zip(self._slots, counts, strict=False)):
                if n:
                    _set_uniform(ip, "u_id", float(i + 1))
                    slot.id_vao.render(vertices=n)

            # Pass 3: box filter + composite over the background.
            ctx.disable(ctx.DEPTH_TEST)
            cp = self._comp_prog
            _set_uniform(cp, "u_ss", ss)
            _set_uniform(cp, "u_use_bg_tex", int(bg_image is not None))
            _set_uniform(cp, "u_bg_color", tuple(float(c) for c in bg_color))
            if bg_image is not None:
                targets.bg_tex.write(bg_image)
            targets.scene_tex.use(0)
            targets.bg_tex.use(1)
            targets.out_fbo.use()
            self._comp_vao.render(mode=ctx.TRIANGLE_STRIP)

            rgb = np.empty((H, W, 3), dtype=np.uint8)
            targets.out_fbo.read_into(rgb, components=3, alignment=1)
            iddepth = np.empty((H, W, 2), dtype=np.float32)
            targets.id_fbo.read_into(iddepth, components=2, dtype="f4")
        mask = iddepth[..., 0].astype(np.int32) - 1
        depth = np.ascontiguousarray(iddepth[..., 1])
        return RenderResult(rgb=rgb, mask=mask, depth=depth, K=K)
