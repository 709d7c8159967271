"""ONNX export of the shipped networks and the ONNX Runtime backend: every graph against its torch
network on real weights and real inputs, dynamic batch and point counts, the export cache, and
the whole pipeline against the torch backend.

Tolerances (measured differences in the comments, 1 intra-op thread):

* occupancy probabilities (I, HALO, R): 1e-4 (measured <= 6e-6); logits 1e-3 (<= 4e-5);
* keypoints: 1e-5 m = 0.01 mm in 3D (<= 2e-7 m), 1e-3 px in 2D (<= 1.3e-4 px), presence logits
  1e-4 (<= 5e-7); K's refined joints 1e-6 m (<= 3e-8 m);
* encoder outputs (feature maps, global codes, tokens, R's anchor features): 1e-4 absolute on
  values of order 1-5 (<= 1e-5);
* pipeline: mesh volumes within 1 % (measured identical to ~1e-6 relative with given keypoints);
  learned keypoints within 0.1 mm (measured 0.04 mm, see the test).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# onnx and onnxruntime come with the `dev` extra: no skip when they are missing
from im2hands_model.hands import to_normalized
from im2hands_model.networks.init_occ import SKIP_DISTANCE_M, Shortcuts
from im2hands_model.networks.ref_occ import hands_center
from im2hands_model.pipeline.model import Im2Hands
from im2hands_model.pipeline.onnx_backend import (
    GRAPHS,
    MANIFEST,
    default_providers,
    export_onnx,
    onnx_networks,
    weights_fingerprint,
)
from im2hands_model.pretrained import load_pretrained, manifest

PROB_TOL = 1e-4
LOGIT_TOL = 1e-3
FEATURE_TOL = 1e-4
POINT_COUNTS = (1, 7, 5000)
TEST_SEED, SCENE = 300, 2  # a held-out test scene with both hands touching


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for torch and for the sessions (made under this setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def nets() -> dict:
    return {name: load_pretrained(name) for name in ("kpts_pred", "kpts_ref", "halo", "ref_occ")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "graphs"
    export_onnx(out)
    return out


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory, exported, nets) -> Path:
    """An export cache holding :func:`export_onnx`'s graphs (so nothing is exported twice), laid
    out as the default one under ``$IM2HANDS_CACHE``."""
    root = tmp_path_factory.mktemp("cache") / "onnx"
    shutil.copytree(exported, root / weights_fingerprint(nets)[:16])
    return root


@pytest.fixture(scope="module")
def ort(nets, cache_root) -> dict:
    return onnx_networks(nets, "cpu", cache_dir=cache_root)


@pytest.fixture(scope="module")
def scene() -> dict:
    from im2hands_model.data.synthetic import SceneGenerator

    return SceneGenerator(points_per_hand=16, full_frame=True).generate(TEST_SEED, SCENE).arrays


@pytest.fixture(scope="module")
def batch(scene) -> dict:
    """Batch 2: the scene's crop, keypoints and intrinsics, and a mirrored, perturbed copy with
    the right hand only."""
    gen = torch.Generator().manual_seed(0)
    image = torch.from_numpy(scene["image"].copy()).permute(2, 0, 1)[None].float() / 255.0
    K = torch.from_numpy(scene["K"])[None]
    joints = torch.from_numpy(scene["joints_3d"])[None]
    noisy = joints + 0.004 * torch.randn(joints.shape, generator=gen)
    return {
        "image": torch.cat([image, image.flip(-1)]),
        "K": torch.cat([K, K]),
        "joints": torch.cat([joints, noisy]),
        "present": torch.tensor([[True, True], [False, True]]),
    }


def _points_near_hands(batch: dict, poses: list, q: int, seed: int) -> torch.Tensor:
    """``[B, 2, q, 3]`` points in each hand's own normalised space, around its keypoints (about
    half inside, half outside the hand)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for h, pose in enumerate(poses):
        jn = to_normalized(batch["joints"][:, h], pose.rot, pose.origin)  # unmirrored [B, 21, 3]
        pick = torch.randint(0, 21, (q,), generator=gen)
        out.append(jn[:, pick] + 0.04 * torch.randn(jn.shape[0], q, 3, generator=gen))
    return torch.stack(out, 1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------- export
def test_export_writes_every_graph_and_a_manifest(exported):
    man = json.loads((exported / MANIFEST).read_text())
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        [f"{g}.onnx" for g in GRAPHS] + [MANIFEST]
    )
    assert list(man["graphs"]) == list(GRAPHS)
    shipped = manifest()["models"]
    assert man["weights"] == {name: shipped[name]["sha256"] for name in man["weights"]}
    assert set(man["weights"]) == {"kpts_pred", "kpts_ref", "halo", "init_occ", "ref_occ"}
    hand = man["graphs"]["init_hand_left"]
    assert hand["inputs"]["points"]["shape"] == ["batch", "points", 3]
    assert hand["outputs"]["logits"]["shape"] == ["batch", "points"]
    assert man["graphs"]["init_encoder"]["inputs"]["image"]["shape"] == ["batch", 3, 256, 256]
    for entry in man["graphs"].values():
        assert entry["bytes"] == (exported / entry["file"]).stat().st_size


def test_cached_export_is_reused_and_providers_can_be_forced(nets, cache_root, ort):
    folder = cache_root / weights_fingerprint(nets)[:16]
    # the cache holds export_onnx's manifest (with source weights): it was reused, not rewritten
    assert json.loads((folder / MANIFEST).read_text())["weights"]
    assert [p.name for p in cache_root.iterdir()] == [folder.name]
    assert default_providers("cpu") == ["CPUExecutionProvider"]
    session = ort["kpts_pred"].session.session
    assert session.get_providers() == ["CPUExecutionProvider"]
    forced = onnx_networks(nets, "cpu", cache_dir=cache_root, providers=["CPUExecutionProvider"])
    assert forced["halo"].kernel.sessions[0].session.get_providers() == ["CPUExecutionProvider"]


def test_image_graphs_reject_other_sizes(ort):
    with pytest.raises(ValueError, match="256"):
        ort["ref_occ"].encoder(torch.zeros(1, 3, 128, 128))


# ---------------------------------------------------------------------------------- keypoints
@torch.no_grad()
def test_keypoint_predictor_matches_torch(nets, ort, batch):
    ref = nets["kpts_pred"](batch["image"], batch["K"])
    out = ort["kpts_pred"](batch["image"], batch["K"])
    assert out.joints.shape == (2, 2, 21, 3) and out.joints_2d.shape == (2, 2, 21, 2)
    assert _max_diff(out.joints, ref.joints) < 1e-5  # metres
    assert _max_diff(out.joints_2d, ref.joints_2d) < 1e-3  # pixels
    assert _max_diff(out.presence_logit, ref.presence_logit) < 1e-4
    assert torch.equal(out.present(), ref.present())


@torch.no_grad()
def test_keypoint_refiner_matches_torch(nets, ort, batch):
    args = (batch["joints"], batch["present"])
    ref = nets["kpts_ref"](*args, image=batch["image"], K=batch["K"])
    out = ort["kpts_ref"](*args, image=batch["image"], K=batch["K"])
    assert _max_diff(ref, batch["joints"]) > 1e-3  # K moves the joints (so this compares)
    assert _max_diff(out, ref) < 1e-6
    assert torch.equal(out[1, 0], batch["joints"][1, 0])  # the absent hand passes through


# ---------------------------------------------------------------------------------- I and HALO
@torch.no_grad()
def test_initial_encoder_matches_torch(nets, ort, batch):
    ref = nets["ref_occ"].init.encode(batch["image"])
    out = ort["ref_occ"].init.encode(batch["image"])
    assert out.image_size == ref.image_size == (256, 256)
    assert _max_diff(out.tokens, ref.tokens) < FEATURE_TOL
    assert _max_diff(out.feats.fmap, ref.feats.fmap) < FEATURE_TOL
    assert _max_diff(out.feats.global_code, ref.feats.global_code) < FEATURE_TOL


@pytest.mark.parametrize("name", ["init", "halo"])
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "dense"])
@torch.no_grad()
def test_hand_graphs_match_torch_for_any_point_count(nets, ort, batch, name, skip):
    net = nets["ref_occ"].init if name == "init" else nets["halo"]
    drop_in = ort["ref_occ"].init if name == "init" else ort["halo"]
    # the graphs run every part: compare with the exact, unculled I (with culling asked for, the
    # CPU drop-in hands I's part MLPs to torch, see test_culled_i_runs_in_torch_on_onnx_tokens)
    shortcuts = Shortcuts(SKIP_DISTANCE_M if skip else None)
    ctx = net.encode(batch["image"])  # the same context for both: this tests the hands
    poses = net.poses(batch["joints"])
    inside = 0
    for q in POINT_COUNTS:
        points = _points_near_hands(batch, poses, q, seed=q)
        args = (points, batch["joints"], batch["K"], ctx, batch["present"], poses)
        ref = net.forward_normalized(*args, shortcuts=shortcuts)
        out = drop_in.forward_normalized(*args, shortcuts=shortcuts)
        assert out.shape == ref.shape == (2, 2, q)
        assert _max_diff(out, ref) < LOGIT_TOL
        assert _max_diff(torch.sigmoid(out), torch.sigmoid(ref)) < PROB_TOL
        inside += int((ref > 0).sum())
        one = drop_in.forward_normalized(*args, hand=1, shortcuts=shortcuts)
        assert torch.equal(one[:, 1], out[:, 1]) and bool((one[:, 0] == -20.0).all())
    assert inside > 1000  # the comparison covers the hands' insides too


@torch.no_grad()
def test_culled_i_runs_in_torch_on_onnx_tokens(nets, ort, batch):
    """With part culling (the pipeline's default) the CPU drop-in runs I's part MLPs in torch,
    on the ONNX encoder's tokens: the same logits as the torch network with culling."""
    net, drop_in = nets["ref_occ"].init, ort["ref_occ"].init
    shortcuts = Shortcuts(SKIP_DISTANCE_M, 4)
    ctx = drop_in.encode(batch["image"])
    poses = net.poses(batch["joints"])
    points = _points_near_hands(batch, poses, 2000, seed=3)
    args = (points, batch["joints"], batch["K"], ctx, batch["present"], poses)
    assert torch.equal(drop_in.forward_normalized(*args, shortcuts=shortcuts),
                       net.forward_normalized(*args, shortcuts=shortcuts))  # fmt: skip


# ---------------------------------------------------------------------------------- R
@pytest.fixture(scope="module")
def refine_inputs(nets, batch) -> dict:
    gen = torch.Generator().manual_seed(1)
    refined = nets["ref_occ"]
    with torch.no_grad():
        feats = refined.encoder(batch["image"])
    center = hands_center(batch["joints"], batch["present"])
    pick = torch.randint(0, 21, (refined.refine.num_anchors,), generator=gen)
    noise = 0.01 * torch.randn(2, 2, len(pick), 3, generator=gen)
    anchors = batch["joints"][:, :, pick] + noise
    return {"feats": feats, "center": center, "anchors": anchors}


@torch.no_grad()
def test_refinement_encoders_match_torch(nets, ort, batch, refine_inputs):
    ref = nets["ref_occ"].encoder(batch["image"])
    out = ort["ref_occ"].encoder(batch["image"])
    assert out.stride == ref.stride
    assert _max_diff(out.fmap, ref.fmap) < FEATURE_TOL
    assert _max_diff(out.global_code, ref.global_code) < FEATURE_TOL

    r = refine_inputs
    args = (r["anchors"], batch["present"], batch["K"], r["feats"], r["center"])
    ref_ctx = nets["ref_occ"].refine.encode_context(*args)
    ctx = ort["ref_occ"].refine.encode_context(*args)
    assert torch.equal(ctx.present, ref_ctx.present)
    assert _max_diff(ctx.anchors, ref_ctx.anchors) < 1e-6
    assert _max_diff(ctx.features, ref_ctx.features) < FEATURE_TOL
    assert _max_diff(ctx.latent, ref_ctx.latent) < FEATURE_TOL
    with pytest.raises(ValueError, match="512 anchors"):
        ort["ref_occ"].refine.encode_context(r["anchors"][:, :, :64], *args[1:])

    # the reference mode's per-image state (I's context, R's features and context)
    state_args = (batch["joints"], batch["K"], batch["image"], batch["present"])
    ref_state = nets["ref_occ"].prepare(*state_args, anchors=r["anchors"])
    state = ort["ref_occ"].prepare(*state_args, anchors=r["anchors"])
    assert _max_diff(state.init_ctx.tokens, ref_state.init_ctx.tokens) < FEATURE_TOL
    assert _max_diff(state.ctx.latent, ref_state.ctx.latent) < FEATURE_TOL
    assert torch.equal(state.center, ref_state.center)


@torch.no_grad()
def test_refinement_decoder_matches_torch_for_any_point_count(nets, ort, batch, refine_inputs):
    r = refine_inputs
    refine, drop_in = nets["ref_occ"].refine, ort["ref_occ"].refine
    assert drop_in.num_anchors == refine.num_anchors
    ctx = refine.encode_context(r["anchors"], batch["present"], batch["K"], r["feats"], r["center"])
    gen = torch.Generator().manual_seed(2)
    for q in POINT_COUNTS:
        queries = r["center"][:, None, None] + 0.06 * torch.randn(2, 2, q, 3, generator=gen)
        init = 4.0 * torch.randn(2, 2, q, generator=gen)
        common = (ctx, batch["K"], r["feats"], r["center"])
        ref = refine.decode(queries, init, *common)
        out = drop_in.decode(queries, init, *common)
        assert out.shape == ref.shape == (2, 2, q)
        assert _max_diff(out, ref) < LOGIT_TOL
        assert _max_diff(torch.sigmoid(out), torch.sigmoid(ref)) < PROB_TOL
        assert torch.equal(out[1, 0], init[1, 0])  # absent hand: I's logits unchanged
        # the split decoder (features on a coarse band, head everywhere), shared queries, one hand
        feats_ref = refine.decode(queries, init, *common, return_features=True)
        feats_out = drop_in.decode(queries, init, *common, return_features=True)
        assert _max_diff(feats_out, feats_ref) < FEATURE_TOL
        head = drop_in.decode_head(feats_ref, init, batch["present"])
        assert _max_diff(head, refine.decode_head(feats_ref, init, batch["present"])) < LOGIT_TOL
        shared = drop_in.decode(queries[:, 1], init, *common)
        assert _max_diff(shared, refine.decode(queries[:, 1], init, *common)) < LOGIT_TOL
        one = drop_in.decode(queries[:, 1:], init[:, 1:], *common, hand=1)
        assert _max_diff(one, ref[:, 1:]) < LOGIT_TOL


# ---------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipelines(cache_root) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IM2HANDS_CACHE", str(cache_root.parent))  # the default cache: $.../onnx
        return {
            backend: Im2Hands.from_pretrained(
                device="cpu", backend=backend, resolution=64, keypoint_source="learned"
            )
            for backend in ("torch", "onnxruntime")
        }


def _volumes(result) -> list[float]:
    return [hand.mesh.volume for hand in result.hands]


def test_pipeline_meshes_match_the_torch_backend(pipelines, scene):
    assert pipelines["onnxruntime"].backend == "onnxruntime"
    frame = (scene["image_full"], scene["K_full"])
    runs = {b: m(*frame, keypoints=scene["joints_3d"]) for b, m in pipelines.items()}
    ref, out = _volumes(runs["torch"]), _volumes(runs["onnxruntime"])
    assert all(v > 1e-5 for v in ref)  # two real hands (m^3)
    np.testing.assert_allclose(out, ref, rtol=0.01)
    np.testing.assert_allclose(out, ref, rtol=1e-3)  # measured ~1e-6


def test_pipeline_learned_keypoints_match_the_torch_backend(pipelines, scene):
    frame = (scene["image_full"], scene["K_full"])
    runs = {b: m(*frame) for b, m in pipelines.items()}
    joints = {b: np.stack([h.keypoints for h in r.hands if h]) for b, r in runs.items()}
    assert joints["torch"].shape == joints["onnxruntime"].shape
    # 0.1 mm: the second pass's crop window follows the first pass's 2D keypoints, so their
    # ~1e-4 px difference resamples the second crop slightly differently (measured 0.04 mm)
    np.testing.assert_allclose(joints["onnxruntime"], joints["torch"], atol=1e-4)  # metres
    np.testing.assert_allclose(_volumes(runs["onnxruntime"]), _volumes(runs["torch"]), rtol=0.01)
