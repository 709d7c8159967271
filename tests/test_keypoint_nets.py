"""Image backbone, keypoint predictor, keypoint refiner K and their training stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from im2hands_model.data.shards import ShardDataset
from im2hands_model.hands import NUM_JOINTS, SKELETON_EDGES, skeleton_chirality
from im2hands_model.networks.backbone import (
    ImageEncoder,
    ImageFeatures,
    PatchTokenizer,
    pixel_aligned,
    project_points,
)
from im2hands_model.networks.kpts_pred import KeypointPredictor, keypoint_loss
from im2hands_model.networks.kpts_ref import (
    KeypointRefiner,
    add_keypoint_noise,
    normalized_adjacency,
    refine_loss,
    two_hand_adjacency,
    two_hand_edges,
)
from im2hands_model.training.stages import check_stage_class, load_stage
from im2hands_model.training.stages.kpts_pred import GT_COLOUR, KptsPredStage
from im2hands_model.training.stages.kpts_ref import KptsRefStage

TINY_ENCODER = {"depth": "resnet18", "base_width": 8, "feature_dim": 16, "global_dim": 32}
KEYS = ["image", "K", "joints_3d", "joints_2d", "hand_present", "scene_index"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These small networks run far faster on one thread when the cores are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _intrinsics(b: int, f: float = 150.0, cx: float = 30.0, cy: float = 34.0) -> torch.Tensor:
    K = torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
    return K.expand(b, 3, 3).clone()


def _random_hands(b: int, seed: int = 0) -> torch.Tensor:
    """Plausible two-hand joint sets ``[b, 2, 21, 3]`` in front of the camera (metres)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([[-0.08, 0.0, 0.5], [0.08, 0.0, 0.5]])
    return base[None, :, None] + 0.05 * torch.randn((b, 2, NUM_JOINTS, 3), generator=g)


def _randomize_head(refiner: KeypointRefiner, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        refiner.offset.weight.copy_(torch.randn(refiner.offset.weight.shape, generator=g))
        refiner.offset.bias.copy_(torch.randn(refiner.offset.bias.shape, generator=g))


# ----------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth,width", [("resnet18", 8), ("resnet50", 4)])
def test_encoder_shapes_and_gradients(depth: str, width: int) -> None:
    torch.manual_seed(0)
    enc = ImageEncoder(depth, base_width=width, feature_dim=12, global_dim=20)
    image = torch.rand(2, 3, 64, 96, requires_grad=True)
    feats = enc(image)
    assert isinstance(feats, ImageFeatures)
    assert feats.fmap.shape == (2, 12, 16, 24)
    assert feats.global_code.shape == (2, 20)
    assert feats.stride == 4
    (feats.fmap.square().mean() + feats.global_code.square().mean()).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert enc.stem[0].weight.grad.abs().sum() > 0
    assert enc.global_head.weight.grad.abs().sum() > 0
    # ResNet-50 layout: bottlenecks widen 4x, so the last stage has 8 * 4 * width channels.
    last = 8 * width * (4 if depth == "resnet50" else 1)
    assert enc.global_head.in_features == last


def test_encoder_per_sample_and_normalised() -> None:
    torch.manual_seed(0)
    enc = ImageEncoder("resnet18", 8, 16, 32).eval()
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        together = enc(images).fmap
        alone = enc(images[1:2]).fmap
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-4)
    assert torch.allclose(enc.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        enc(torch.rand(1, 64, 64))
    with pytest.raises(ValueError, match="depth"):
        ImageEncoder("resnet7")


def test_patch_tokenizer_any_size() -> None:
    torch.manual_seed(0)
    tok = PatchTokenizer(16, 32, patch=16, grid=4)
    for size in (8, 16, 32, 30, 3):
        out = tok(torch.rand(2, 16, size, size))
        assert out.shape == (2, 16, 32)
        assert torch.isfinite(out).all()
    # Tokens depend on where things are in the picture.
    fmap = torch.zeros(1, 16, 32, 32)
    fmap[..., :8, :8] = 1.0
    a = tok(fmap)
    b = tok(fmap.flip(-1))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="divide"):
        PatchTokenizer(16, 30, heads=4)


def test_pixel_aligned_reads_the_projected_pixel() -> None:
    stride, h, w = 4, 16, 20
    # Channel 0 holds each cell's centre u in pixels, channel 1 its centre v.
    u = (torch.arange(w) + 0.5) * stride
    v = (torch.arange(h) + 0.5) * stride
    fmap = torch.stack([u.expand(h, w), v[:, None].expand(h, w)])[None]
    K = _intrinsics(1, f=120.0, cx=41.0, cy=29.5)
    pts = torch.tensor([[[0.01, -0.02, 0.5], [0.05, 0.03, 0.4], [-0.03, 0.01, 0.6]]])
    feats = pixel_aligned(fmap, pts, K, stride)
    uv, valid = project_points(pts, K)
    assert valid.all()
    # Manual projection: u = f x / z + cx.
    expected_u = 120.0 * pts[0, :, 0] / pts[0, :, 2] + 41.0
    torch.testing.assert_close(uv[0, :, 0], expected_u)
    # A linear feature map is reproduced exactly by bilinear sampling between cell centres.
    torch.testing.assert_close(feats[0], uv[0], atol=1e-4, rtol=0)

    # Behind the camera, outside the crop or not finite: zeros.
    bad = torch.tensor(
        [[[0.0, 0.0, -0.5], [0.0, 0.0, 0.0], [1.0, 0.0, 0.5], [float("nan"), 0.0, 0.5]]]
    )
    assert (pixel_aligned(fmap, bad, K, stride) == 0).all()
    # Within half a cell of the border the border cell's value is used (no fade to zero).
    edge = torch.tensor([[[(0.5 - 41.0) * 0.5 / 120.0, 0.0, 0.5]]])  # u = 0.5 px
    assert pixel_aligned(fmap, edge, K, stride)[0, 0, 0] == pytest.approx(2.0)


# ----------------------------------------------------------------------------------------------
# Keypoint predictor
# ----------------------------------------------------------------------------------------------


def test_predictor_shapes_and_backprojection() -> None:
    torch.manual_seed(0)
    net = KeypointPredictor(TINY_ENCODER, head_dim=16).eval()
    image = torch.rand(2, 3, 64, 64)
    K = _intrinsics(2)
    with torch.no_grad():
        pred = net(image, K)
    assert pred.joints.shape == (2, 2, 21, 3)
    assert pred.joints_2d.shape == (2, 2, 21, 2)
    assert pred.presence_logit.shape == (2, 2)
    assert pred.heatmaps.shape == (2, 2, 21, 16, 16)
    torch.testing.assert_close(pred.heatmaps.flatten(-2).sum(-1), torch.ones(2, 2, 21))
    assert (pred.joints[..., 2] > 0).all()
    # Projecting the 3D joints gives the 2D joints; depths are wrist depth + relative depth.
    uv, _ = project_points(pred.joints.reshape(2, -1, 3), K)
    torch.testing.assert_close(uv.view(2, 2, 21, 2), pred.joints_2d, atol=1e-3, rtol=0)
    torch.testing.assert_close(pred.rel_depth[..., 0], torch.zeros(2, 2))
    torch.testing.assert_close(
        pred.joints[..., 2], pred.root_depth[..., None] + pred.rel_depth, atol=1e-6, rtol=1e-5
    )
    # Soft-argmax stays within the crop.
    assert (pred.joints_2d >= 0).all() and (pred.joints_2d <= 64).all()


def test_predictor_follows_the_intrinsics() -> None:
    """Same picture, twice the focal length: same 2D, twice the wrist depth; a shifted principal
    point moves the 3D joints, not the 2D ones."""
    torch.manual_seed(0)
    net = KeypointPredictor(TINY_ENCODER, head_dim=16).eval()
    with torch.no_grad():  # make the root-depth head non-trivial
        net.root_mlp[-1].weight.normal_(0, 0.5)
        net.root_mlp[-1].bias.fill_(0.3)
    image = torch.rand(2, 3, 64, 64)
    K1 = _intrinsics(2, f=150.0)
    K2 = _intrinsics(2, f=300.0)
    K3 = _intrinsics(2, f=150.0, cx=20.0, cy=40.0)
    with torch.no_grad():
        p1, p2, p3 = net(image, K1), net(image, K2), net(image, K3)
    torch.testing.assert_close(p2.joints_2d, p1.joints_2d)
    torch.testing.assert_close(p2.root_depth, 2 * p1.root_depth)
    torch.testing.assert_close(p3.joints_2d, p1.joints_2d)
    torch.testing.assert_close(p3.joints[..., 2], p1.joints[..., 2])
    dx = (30.0 - 20.0) * p1.joints[..., 2] / 150.0
    torch.testing.assert_close(p3.joints[..., 0], p1.joints[..., 0] + dx, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="K must be"):
        net(image, K1[:1])
    with pytest.raises(ValueError, match="empty"):
        net(image[:0], K1[:0])


def test_keypoint_loss_terms_and_missing_hand() -> None:
    torch.manual_seed(0)
    net = KeypointPredictor(TINY_ENCODER, head_dim=16)
    image, K = torch.rand(2, 3, 64, 64), _intrinsics(2)
    pred = net(image, K)
    gt3 = pred.joints.detach().clone()
    gt2 = pred.joints_2d.detach() + 3.0  # 3 px off in u and v
    gt3[..., 2] = gt3[..., 2] + 0.02  # every depth 2 cm deeper: relative depths unchanged
    present = torch.tensor([[True, True], [True, False]])
    gt3[1, 1] = float("nan")  # the missing hand's joints are garbage
    gt2[1, 1] = float("nan")
    batch = {"joints_3d": gt3, "joints_2d": gt2, "hand_present": present}
    loss, terms = keypoint_loss(pred, batch)
    assert torch.isfinite(loss)
    assert terms["loss_2d"] == pytest.approx(3.0 / 64, rel=1e-4)
    assert terms["loss_rel_depth"] == pytest.approx(0.0, abs=1e-6)
    assert terms["loss_root_depth"] == pytest.approx(0.02, rel=1e-3)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    with pytest.raises(KeyError):
        keypoint_loss(pred, batch, {"w_bogus": 1.0})


def test_free_slots_order_and_loss_pick_the_better_assignment(tmp_path) -> None:
    """free_slots: outputs come out in (left, right) order by the handedness head; the loss
    scores the ground truth against both slot orders and trains handedness on the better one;
    the reordering survives ONNX export."""
    torch.manual_seed(0)
    net = KeypointPredictor(TINY_ENCODER, head_dim=16, free_slots=True).eval()
    with torch.no_grad():  # a handedness head that disagrees between slots
        net.handedness[-1].weight.normal_(0, 1.0)
    image, K = torch.rand(4, 3, 64, 64), _intrinsics(4)
    with torch.no_grad():
        pred = net(image, K)
    hand = pred.handedness_logit
    assert hand.shape == (4, 2) and (hand[:, 0] <= hand[:, 1]).all()

    # GT = the prediction with its hands exchanged in crops 0 and 2: the loss matches them
    # anyway (joint terms as for an exact match) and calls those two slot orders wrong
    flip = torch.tensor([True, False, True, False])
    gt3 = torch.where(flip[:, None, None, None], pred.joints[:, [1, 0]], pred.joints)
    gt2 = torch.where(flip[:, None, None, None], pred.joints_2d[:, [1, 0]], pred.joints_2d)
    batch = {"joints_3d": gt3, "joints_2d": gt2, "hand_present": torch.ones(4, 2, dtype=torch.bool)}
    _, terms = keypoint_loss(pred, batch)
    assert terms["loss_2d"] < 1e-6 and terms["loss_root_depth"] < 1e-6
    assert terms["swapped"] == 0.5 and terms["handedness_acc"] == 0.5
    fixed = KeypointPredictor(TINY_ENCODER, head_dim=16).eval()
    fixed.load_state_dict({k: v for k, v in net.state_dict().items() if "handedness" not in k})
    with torch.no_grad():
        plain = fixed(image, K)
    assert plain.handedness_logit is None
    _, plain_terms = keypoint_loss(plain, batch)  # without free slots: no order is tried
    assert plain_terms["loss_2d"] > 1e-3 and "swapped" not in plain_terms

    joints, hand_ort = _onnx_outputs(net, image, K, tmp_path / "kpts.onnx")
    torch.testing.assert_close(torch.from_numpy(joints), pred.joints, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(hand_ort), hand, atol=1e-4, rtol=1e-4)


def _onnx_outputs(net, image: torch.Tensor, K: torch.Tensor, path) -> list[np.ndarray]:
    """(joints, handedness logits) of ``net`` exported to ONNX and run by ONNX Runtime."""
    import onnxruntime as ort

    from im2hands_model.pipeline.onnx_backend import export as onnx_backend

    opset = onnx_backend.DEFAULT_OPSET
    torch.onnx.register_custom_op_symbolic("aten::linalg_inv", onnx_backend._inverse, opset)
    torch.onnx.export(_OutputsOf(net), (image, K), str(path), input_names=["image", "K"],
                      output_names=["joints", "hand"], dynamo=False, opset_version=opset,
                      dynamic_axes={"image": {0: "b"}, "K": {0: "b"}})  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image.numpy(), "K": K.numpy()})


class _OutputsOf(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.net(image, K)
        return p.joints, p.handedness_logit


# ----------------------------------------------------------------------------------------------
# Keypoint refiner K
# ----------------------------------------------------------------------------------------------


def test_two_hand_graph() -> None:
    edges = two_hand_edges()
    assert len(edges) == 2 * len(SKELETON_EDGES) + 1 == 41
    adj = two_hand_adjacency()
    assert torch.equal(adj, adj.T) and adj.diagonal().sum() == 0
    # Connected: every node is reached from the left wrist.
    seen, todo = {0}, [0]
    while todo:
        i = todo.pop()
        for j in torch.nonzero(adj[i]).flatten().tolist():
            if j not in seen:
                seen.add(j)
                todo.append(j)
    assert seen == set(range(42))
    mask = torch.ones(1, 42, dtype=torch.bool)
    mask[0, 21:] = False
    a = normalized_adjacency(adj, mask)[0]
    torch.testing.assert_close(a[21:, 21:], torch.eye(21))  # masked nodes: self-loop only
    assert (a[:21, 21:] == 0).all()
    torch.testing.assert_close(a, a.T)


@pytest.mark.parametrize("with_image", [False, True])
def test_refiner_identity_at_init_and_absent_hand(with_image: bool) -> None:
    torch.manual_seed(0)
    ref = KeypointRefiner(dim=32, heads=2, encoder=TINY_ENCODER if with_image else None,
                          use_image=with_image)  # fmt: skip
    joints = _random_hands(3)
    present = torch.tensor([[True, True], [True, False], [False, True]])
    image, K = torch.rand(3, 3, 64, 64), _intrinsics(3)
    out = ref(joints, present, image=image, K=K)
    assert torch.equal(out, joints)  # an untrained K is the identity

    _randomize_head(ref)
    out = ref(joints, present, image=image, K=K)
    assert not torch.allclose(out[0], joints[0])
    assert torch.equal(out[1, 1], joints[1, 1]) and torch.equal(out[2, 0], joints[2, 0])

    # An absent hand's input (even NaN) changes nothing about the present hand.
    poisoned = joints.clone()
    poisoned[1, 1] = float("nan")
    poisoned[2, 0] = 123.0
    out2 = ref(poisoned, present, image=image, K=K)
    assert torch.isfinite(out2[1, 0]).all() and torch.isfinite(out2[2, 1]).all()
    torch.testing.assert_close(out2[1, 0], out[1, 0])
    torch.testing.assert_close(out2[2, 1], out[2, 1])
    assert torch.isnan(out2[1, 1]).all() and (out2[2, 0] == 123.0).all()
    # A "present" hand with NaN input is passed through, the other hand still refined.
    out3 = ref(poisoned, torch.ones(3, 2, dtype=torch.bool), image=image, K=K)
    assert torch.isnan(out3[1, 1]).all()
    torch.testing.assert_close(out3[1, 0], out[1, 0])
    loss = refine_loss(out3, joints, present)
    assert torch.isfinite(loss)


def test_refiner_translation_equivariant_without_image() -> None:
    torch.manual_seed(0)
    ref = KeypointRefiner(dim=32, heads=2, use_image=False)
    _randomize_head(ref, seed=3)
    joints = _random_hands(4, seed=1)
    present = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    t = torch.tensor([0.07, -0.12, 0.3])
    out = ref(joints, present)
    moved = ref(joints + t, present)
    torch.testing.assert_close(moved, out + t, atol=2e-6, rtol=0)
    # It is not just a translation: the hand's shape changes.
    delta = out - joints
    assert (delta[0] - delta[0, :, :1]).abs().max() > 1e-4


def test_keypoint_noise_and_refine_loss() -> None:
    joints = _random_hands(64, seed=2)
    present = torch.rand(64, 2, generator=torch.Generator().manual_seed(0)) > 0.3
    noisy = add_keypoint_noise(joints, present, torch.Generator().manual_seed(5), 8.0, 10.0)
    again = add_keypoint_noise(joints, present, torch.Generator().manual_seed(5), 8.0, 10.0)
    assert torch.equal(noisy, again)
    assert torch.equal(noisy[~present], joints[~present])
    d = (noisy - joints)[present]  # [n, 21, 3]
    # Per-hand offset shared by the joints + independent per-joint noise.
    per_hand = d.mean(1)
    residual = d - per_hand[:, None]
    assert residual.std().item() * 1000 == pytest.approx(8.0 * (20 / 21) ** 0.5, rel=0.1)
    assert per_hand.std().item() * 1000 == pytest.approx((10.0**2 + 8.0**2 / 21) ** 0.5, rel=0.2)

    gt = joints[:2]
    both = torch.ones(2, 2, dtype=torch.bool)
    shifted = gt + torch.tensor([0.003, 0.0, 0.004])  # 5 mm rigid shift
    assert float(refine_loss(shifted, gt, both, abs_weight=0.0)) == pytest.approx(0.0, abs=1e-3)
    assert float(refine_loss(shifted, gt, both, abs_weight=1.0)) == pytest.approx(5.0, rel=1e-4)
    bent = gt.clone()
    bent[..., 4, 1] += 0.021  # one fingertip 21 mm off: 1 mm mean over 21 joints
    assert float(refine_loss(bent, gt, both, abs_weight=0.0)) == pytest.approx(1.0, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# Training stages on the tiny dataset
# ----------------------------------------------------------------------------------------------

STEPS = 45  # steps 40-44 repeat the batches and noise of steps 0-4 (common random numbers)
PERIOD = STEPS - 5


def _tiny_batches(root) -> tuple[list[dict], dict]:
    ds = ShardDataset(root, keys=KEYS)
    items = [ds[i] for i in range(len(ds))]
    return [default_collate(items[i : i + 4]) for i in range(0, 16, 4)], default_collate(items)


def _train(stage, batches: list[dict]) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(0)
    model = stage.build_model(torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS):
        # The engine seeds the generator per step; here step s and s + 40 share a seed so that
        # the first and last five losses are measured on identical inputs.
        gen = torch.Generator().manual_seed(step % PERIOD)
        loss, terms = stage.loss(model, batches[step % len(batches)], gen)
        assert all(np.isfinite(v) for v in terms.values()), terms
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses


def _cfg() -> dict:
    model = {"encoder": TINY_ENCODER, "head_dim": 16, "dim": 32, "heads": 2, "layers": 4}
    return {"stage": "x", "model": model, "loss": {}}


def test_stages_follow_the_protocol() -> None:
    for name, cls in (("kpts_pred", KptsPredStage), ("kpts_ref", KptsRefStage)):
        check_stage_class(cls, name)
        assert load_stage(name) is cls
    with pytest.raises(ValueError, match="unknown loss keys"):
        KptsRefStage({"loss": {"sigma": 3}})
    with pytest.raises(ValueError, match="unknown loss keys"):
        KptsPredStage({"loss": {"w_2D": 3}})


def test_kpts_pred_stage_trains(tiny_dataset_dir) -> None:
    batches, val = _tiny_batches(tiny_dataset_dir)
    stage = KptsPredStage(_cfg())
    model, losses = _train(stage, batches)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    metrics = stage.validate(model, val)
    assert set(metrics) >= {"mpjpe_mm", "mpjpe_abs_mm", "presence_acc"}
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert 0.0 <= metrics["presence_acc"] <= 1.0
    assert metrics["mpjpe_abs_mm"] >= metrics["mpjpe_mm"] * 0.5
    # the better hand order can only lower the 2D error; GT swapped: the orders trade places
    assert metrics["px_2d_either_order"] <= metrics["px_2d"] + 1e-4
    flipped = {**val, "joints_2d": val["joints_2d"][:, [1, 0]],
               "hand_present": val["hand_present"][:, [1, 0]]}  # fmt: skip
    from im2hands_model.training.stages.kpts_pred import _px_either_order

    with torch.no_grad():
        uv = model(val["image"], val["K"]).joints_2d
    assert _px_either_order(uv, flipped["joints_2d"], flipped["hand_present"].bool()) == (
        pytest.approx(metrics["px_2d_either_order"], rel=1e-5)
    )
    pic = stage.visualize(model, val)
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3
    assert pic.shape[1] > 3 * pic.shape[0]  # four crops side by side
    assert (pic == np.array(GT_COLOUR, np.uint8)).all(-1).sum() > 100  # GT skeletons drawn


def test_kpts_ref_stage_trains(tiny_dataset_dir) -> None:
    batches, val = _tiny_batches(tiny_dataset_dir)
    stage = KptsRefStage(_cfg())
    model, losses = _train(stage, batches)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    first = stage.validate(model, val)
    again = stage.validate(model, val)
    assert first == again  # fixed validation noise
    assert first["mpjpe_mm"] < first["mpjpe_in_mm"], first
    # Validation noise per scene: independent of how the scenes are batched.
    half = {k: v[:8] for k, v in val.items()}
    torch.testing.assert_close(stage.validation_noise(half), stage.validation_noise(val)[:8])
    pic = stage.visualize(model, val)
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3


def test_slot_order_by_chirality_orders_by_skeleton_shape_and_exports(tmp_path) -> None:
    """slot_order="chirality": slot 0 holds the skeleton that is more of a left hand, whatever
    the handedness head says; the same weights ordered by the head disagree somewhere; ONNX
    keeps the order."""
    torch.manual_seed(1)
    by_shape = KeypointPredictor(TINY_ENCODER, head_dim=16, free_slots=True,
                                 slot_order="chirality").eval()  # fmt: skip
    with torch.no_grad():  # relative depths and handedness calls that are not all zero
        by_shape.depth.weight.normal_(0, 1.0)
        by_shape.depth.bias.normal_(0, 1.0)
        by_shape.handedness[-1].weight.normal_(0, 1.0)
    by_head = KeypointPredictor(TINY_ENCODER, head_dim=16, free_slots=True).eval()
    by_head.load_state_dict(by_shape.state_dict())
    image, K = torch.rand(8, 3, 64, 64), _intrinsics(8)
    with torch.no_grad():
        shape, head = by_shape(image, K), by_head(image, K)
    chir = skeleton_chirality(shape.joints)
    assert (chir[:, 0] <= chir[:, 1]).all() and (chir.abs() > 1e-6).all()
    same = (shape.joints == head.joints).flatten(1).all(-1)
    swapped = (shape.joints == head.joints[:, [1, 0]]).flatten(1).all(-1)
    assert (same | swapped).all() and swapped.any()  # the two rules disagree on some crops
    assert (
        skeleton_chirality(head.joints)[swapped, 0] > skeleton_chirality(head.joints)[swapped, 1]
    ).all()
    with pytest.raises(ValueError, match="free_slots"):
        KeypointPredictor(TINY_ENCODER, head_dim=16, slot_order="chirality")
    with pytest.raises(ValueError, match="slot_order"):
        KeypointPredictor(TINY_ENCODER, head_dim=16, free_slots=True, slot_order="size")

    joints, _ = _onnx_outputs(by_shape, image, K, tmp_path / "kpts_chirality.onnx")
    torch.testing.assert_close(torch.from_numpy(joints), shape.joints, atol=1e-4, rtol=1e-4)


def test_evaluation_cache_tells_slot_orders_apart() -> None:
    """The same weights with another slot order predict other hands, so their cached table rows
    must not be reused (training/evaluate.py --cache keys rows by KeypointSources.digest)."""
    from im2hands_model.training.evaluate import KeypointSources

    torch.manual_seed(0)
    head = KeypointPredictor(TINY_ENCODER, head_dim=16, free_slots=True).eval()
    chiral = KeypointPredictor(TINY_ENCODER, head_dim=16, free_slots=True,
                               slot_order="chirality").eval()  # fmt: skip
    chiral.load_state_dict(head.state_dict())
    refiner = KeypointRefiner(dim=32, heads=2, use_image=False)
    a, b = KeypointSources(head, refiner, None), KeypointSources(chiral, refiner, None)
    assert a.digest("gt") == b.digest("gt")
    for source in a.available()[1:]:
        assert a.digest(source) != b.digest(source), source
    twin = KeypointPredictor(TINY_ENCODER, head_dim=16, free_slots=True).eval()
    twin.load_state_dict(head.state_dict())
    assert KeypointSources(twin, refiner, None).digest("pred") == a.digest("pred")


def test_skeleton_chirality_on_rendered_hands(tiny_dataset_dir) -> None:
    """Every ground-truth hand of the synthetic scenes has the sign of its side; a mirror flips
    it, a rotation keeps it, and numpy and torch agree."""
    data = ShardDataset(tiny_dataset_dir, keys=["joints_3d", "hand_present"])
    joints = torch.stack([data[i]["joints_3d"] for i in range(len(data))]).double()
    present = torch.stack([data[i]["hand_present"] for i in range(len(data))]).bool()
    chir = skeleton_chirality(joints)  # [N, 2]
    assert chir.shape == present.shape
    assert (chir[:, 0][present[:, 0]] < 0).all() and (chir[:, 1][present[:, 1]] > 0).all()
    mirrored = joints * torch.tensor([-1.0, 1.0, 1.0], dtype=joints.dtype)
    torch.testing.assert_close(skeleton_chirality(mirrored), -chir)
    skew = torch.tensor([[0.0, -0.7, 0.2], [0.7, 0.0, -0.4], [-0.2, 0.4, 0.0]], dtype=joints.dtype)
    turn = torch.linalg.matrix_exp(skew)
    torch.testing.assert_close(skeleton_chirality(joints @ turn.T + 0.3), chir)
    np.testing.assert_allclose(skeleton_chirality(joints.numpy()), chir.numpy(), atol=1e-12)
