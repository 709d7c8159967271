"""Tests of the point ops (FPS, kNN) and the two-hand occupancy refinement R."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from im2hands_model.hands import from_normalized
from im2hands_model.networks.backbone import ImageEncoder, ImageFeatures
from im2hands_model.networks.point_ops import farthest_point_sample, gather_points, knn
from im2hands_model.networks.ref_occ import (
    TwoHandRefinement,
    overlap_indices,
    penetration_loss,
    sample_anchors,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a few shared cores, more threads mostly wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- point ops


def test_fps_exact_on_a_line_with_mask_and_repeats():
    pts = torch.tensor([[0.0, 1.0, 2.0, 10.0]])[..., None].expand(2, 4, 1)
    pts = torch.cat([pts, torch.zeros(2, 4, 2)], dim=-1)  # points on the x axis
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    idx = farthest_point_sample(pts, 3, mask)
    # Row 0: start 0, farthest is 10 (idx 3), then 2 (min dist 2 beats 1's 1).
    # Row 1: 10 is masked: 0, then 2, then 1.
    assert idx.tolist() == [[0, 3, 2], [0, 2, 1]]
    # Asking for more samples than valid points: all valid ones, then repeats of the first.
    assert farthest_point_sample(pts, 4, mask)[1].tolist() == [0, 2, 1, 0]
    # "first" starts at the first *valid* point.
    m2 = torch.tensor([[False, True, True, True]] * 2)
    assert farthest_point_sample(pts, 2, m2)[0].tolist() == [1, 3]


def _min_pairwise(p: torch.Tensor) -> float:
    d = torch.cdist(p, p)
    d.fill_diagonal_(float("inf"))
    return float(d.min())


def test_fps_spreads_points_better_than_random_subsets():
    g = torch.arange(8, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(1, -1, 3)  # 512 pts
    k = 27
    idx = farthest_point_sample(grid, k)[0]
    assert len(set(idx.tolist())) == k
    fps_min = _min_pairwise(grid[0, idx])
    gen = torch.Generator().manual_seed(0)
    rand_best = max(
        _min_pairwise(grid[0, torch.randperm(512, generator=gen)[:k]]) for _ in range(50)
    )
    assert fps_min > rand_best
    assert fps_min >= 3.0  # 27 points over a 7-unit cube: FPS keeps them >= 3 apart


def test_fps_masked_points_never_chosen_and_random_start_is_deterministic():
    gen = torch.Generator().manual_seed(1)
    pts = torch.rand(3, 200, 3, generator=gen)
    mask = torch.rand(3, 200, generator=gen) > 0.5
    # Masked points are far away (would be picked first) or NaN: still never chosen.
    pts = torch.where(mask[..., None], pts, torch.full_like(pts, 50.0))
    pts[0, ~mask[0]] = float("nan")
    for start in ("first", "random"):
        idx = farthest_point_sample(
            pts, 64, mask, start=start, gen=torch.Generator().manual_seed(3)
        )
        assert bool(torch.gather(mask, 1, idx).all())
        for row in idx:
            assert len(set(row.tolist())) == 64  # no repeats while valid points remain
    a = farthest_point_sample(pts, 16, mask, "random", torch.Generator().manual_seed(5))
    b = farthest_point_sample(pts, 16, mask, "random", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    starts = {
        int(farthest_point_sample(pts, 1, mask, "random", torch.Generator().manual_seed(s))[0, 0])
        for s in range(10)
    }
    assert len(starts) > 1
    with pytest.raises(ValueError, match="no valid point"):
        farthest_point_sample(pts, 4, torch.zeros(3, 200, dtype=torch.bool))


def test_knn_matches_brute_force_with_chunks_and_mask():
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(2, 37, 3, generator=gen, requires_grad=True)
    ref = torch.randn(2, 50, 3, generator=gen)
    full = ((query[:, :, None] - ref[:, None]) ** 2).sum(-1)  # [2, 37, 50]
    ref_d, ref_i = full.topk(5, dim=-1, largest=False)
    for chunk in (None, 7, 1):
        d2, idx = knn(query, ref, 5, chunk=chunk)
        assert torch.equal(idx, ref_i)
        torch.testing.assert_close(d2, ref_d)
    d2.sum().backward()  # differentiable, and equal to the brute-force gradient
    g_knn = query.grad.clone()
    query.grad = None
    ref_d.sum().backward()
    torch.testing.assert_close(g_knn, query.grad)

    mask = torch.rand(2, 50, generator=gen) > 0.3
    masked_full = full.detach().masked_fill(~mask[:, None], float("inf"))
    md, mi = masked_full.topk(4, dim=-1, largest=False)
    d2, idx = knn(query.detach(), ref, 4, ref_mask=mask, chunk=5)
    assert torch.equal(idx, mi)
    torch.testing.assert_close(d2, md)
    assert bool(torch.gather(mask, 1, idx.reshape(2, -1)).all())


def test_gather_points():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    idx = torch.tensor([[[4, 0]], [[1, 1]]])  # [2, 1, 2]
    out = gather_points(x, idx)
    assert out.shape == (2, 1, 2, 3)
    assert torch.equal(out[0, 0, 0], x[0, 4]) and torch.equal(out[1, 0, 1], x[1, 1])
    assert torch.equal(gather_points(x[..., 0], idx), out[..., 0])


# ---------------------------------------------------------------------------- R on synthetic input

IMG = 64


def _encoder() -> ImageEncoder:
    return ImageEncoder(depth="resnet18", base_width=8, feature_dim=16, global_dim=32)


def _refiner(**kw) -> TwoHandRefinement:
    args = dict(image_channels=16, image_global_dim=32, dim=32, latent_dim=48, hidden=48)
    args.update(kw)
    return TwoHandRefinement(**args)


def _scene(b: int = 2, q: int = 300, a: int = 64, seed: int = 0):
    """Two blobs of anchors in front of a pinhole camera, queries around them."""
    gen = torch.Generator().manual_seed(seed)
    center = torch.tensor([0.0, 0.0, 0.5]).repeat(b, 1)
    offsets = torch.tensor([[-0.04, 0.0, 0.0], [0.04, 0.0, 0.0]])
    anchors = (
        center[:, None, None]
        + offsets[None, :, None]
        + 0.03 * torch.randn(b, 2, a, 3, generator=gen)
    )
    queries = center[:, None] + 0.08 * torch.randn(b, q, 3, generator=gen)
    init = 3 * torch.randn(b, 2, q, generator=gen)
    K = torch.tensor([[100.0, 0, IMG / 2], [0, 100.0, IMG / 2], [0, 0, 1]]).repeat(b, 1, 1)
    image = torch.rand(b, 3, IMG, IMG, generator=gen)
    return queries, init, anchors, K, image, center


def _perturb_last_layer(r: TwoHandRefinement, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.dec_out.weight.copy_(0.3 * torch.randn(r.dec_out.weight.shape, generator=gen))
        r.dec_out.bias.fill_(0.1)


def test_untrained_refinement_returns_initial_logits_exactly():
    torch.manual_seed(0)
    queries, init, anchors, K, image, center = _scene()
    enc, r = _encoder(), _refiner()
    feats = enc(image)
    present = torch.ones(2, 2, dtype=torch.bool)
    out = r(queries, init, anchors, present, K, feats, center)
    assert out.shape == init.shape
    assert torch.equal(out, init)
    # Default sizes too (A = 512 anchors, dim 64), with features of matching sizes.
    r_def = TwoHandRefinement(image_channels=16, image_global_dim=32)
    _, _, anchors512, *_ = _scene(a=512)
    assert torch.equal(r_def(queries, init, anchors512, present, K, feats, center), init)


def test_encode_once_decode_many_equals_forward():
    torch.manual_seed(0)
    queries, init, anchors, K, image, center = _scene()
    enc, r = _encoder(), _refiner()
    _perturb_last_layer(r)
    feats = enc(image)
    present = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        full = r(queries, init, anchors, present, K, feats, center)
        ctx = r.encode_context(anchors, present, K, feats, center)
        parts = [
            r.decode(queries[:, s : s + 77], init[:, :, s : s + 77], ctx, K, feats, center)
            for s in range(0, queries.shape[1], 77)
        ]
    torch.testing.assert_close(torch.cat(parts, dim=-1), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full[0], init[0], atol=1e-3)  # the perturbed R does something
    # The context holds normalised anchors: (x - center) / 0.4.
    torch.testing.assert_close(ctx.anchors[0], (anchors[0] - center[0]) / 0.4)


def test_absent_hand_keeps_initial_logits_and_is_ignored():
    torch.manual_seed(0)
    queries, init, anchors, K, image, center = _scene()
    enc, r = _encoder(), _refiner()
    _perturb_last_layer(r)
    feats = enc(image)
    present = torch.tensor([[True, False], [False, True]])
    outs = []
    for garbage in (
        torch.zeros(2, 64, 3),
        1e3 * torch.randn(2, 64, 3),
        torch.full((2, 64, 3), 1.0),
    ):
        a = anchors.clone()
        a[0, 1] = garbage[0]
        a[1, 0] = garbage[1]
        with torch.no_grad():
            out = r(queries, init, a, present, K, feats, center)
        assert bool(torch.isfinite(out).all())
        assert torch.equal(out[0, 1], init[0, 1]) and torch.equal(out[1, 0], init[1, 0])
        outs.append(out)
    # Absent hands' anchors have no influence on the present hands.
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])
    assert not torch.allclose(outs[0][0, 0], init[0, 0], atol=1e-3)
    # NaN anchors are fine for an absent hand, an error for a present one.
    a = anchors.clone()
    a[0, 1] = float("nan")
    with torch.no_grad():
        out = r(queries, init, a, present, K, feats, center)
    torch.testing.assert_close(out, outs[0])
    with pytest.raises(ValueError, match="present hand"):
        r(queries, init, a, torch.ones(2, 2, dtype=torch.bool), K, feats, center)


def test_penetration_loss_values():
    q = 8
    hand = torch.tensor([[0] * 4 + [1] * 4])
    both = torch.ones(1, 2, dtype=torch.bool)
    # Disjoint: hand 0 fills its own points only, hand 1 its own.
    disjoint = torch.full((1, 2, q), -30.0)
    disjoint[0, 0, :4] = 30.0
    disjoint[0, 1, 4:] = 30.0
    assert float(penetration_loss(disjoint, hand, both)) < 1e-9
    # Both hands at occupancy 0.5 everywhere: 0.25.
    assert float(penetration_loss(torch.zeros(1, 2, q), hand, both)) == pytest.approx(0.25)
    # Per-hand means, then their mean: hand 0's single point at 0.25, hand 1's three at ~1.
    logits = torch.full((1, 2, 4), 30.0)
    logits[0, :, 0] = 0.0
    hand1 = torch.tensor([[0, 1, 1, 1]])
    assert float(penetration_loss(logits, hand1, both)) == pytest.approx((0.25 + 1.0) / 2)
    # Scenes without both hands do not count; ignored labels (-1) do not count.
    logits2 = torch.cat([torch.zeros(1, 2, q), torch.full((1, 2, q), 30.0)])
    hand2 = torch.cat([hand, hand])
    hand2[0, :2] = -1
    pres2 = torch.tensor([[True, True], [True, False]])
    assert float(penetration_loss(logits2, hand2, pres2)) == pytest.approx(0.25)
    # No scene with both hands: zero, still differentiable.
    x = torch.zeros(2, 2, q, requires_grad=True)
    loss = penetration_loss(x, hand2, torch.tensor([[True, False], [False, False]]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_gradients_are_finite_and_reach_the_network():
    torch.manual_seed(0)
    queries, init, anchors, K, image, center = _scene()
    enc, r = _encoder(), _refiner()
    present = torch.tensor([[True, True], [True, False]])
    labels = (torch.rand(2, 2, queries.shape[1]) > 0.5).float()
    opt = torch.optim.Adam([*r.parameters(), *enc.parameters()], lr=1e-3)
    for _ in range(2):  # step 1 moves the zero-initialised last layer, step 2 reaches the rest
        opt.zero_grad()
        out = r(queries, init, anchors, present, K, enc(image), center)
        hand = torch.arange(queries.shape[1])[None].expand(2, -1) % 2
        loss = F.binary_cross_entropy_with_logits(out, labels) + 1e-3 * penetration_loss(
            out, hand, present
        )
        loss.backward()
        grads = [p.grad for p in [*r.parameters(), *enc.parameters()] if p.grad is not None]
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        opt.step()
    assert float(r.dec_out.weight.grad.abs().sum()) > 0
    assert float(r.anchor_in.weight.grad.abs().sum()) > 0  # the encoder trains
    assert float(r.cross.gamma[0].weight.grad.abs().sum()) > 0
    assert float(enc.head.weight.grad.abs().sum()) > 0  # and so does R's image encoder


def test_sample_anchors_lie_near_the_initial_surface_and_spread():
    gen = torch.Generator().manual_seed(0)
    b, p, r0 = 2, 20000, 0.05
    center = torch.tensor([0.0, 0.0, 0.5])
    pts = center + 0.1 * (2 * torch.rand(b, 2, p, 3, generator=gen) - 1)
    radius = (pts - center).norm(dim=-1)
    logits = (r0 - radius) * 400.0  # a sphere of radius 5 cm; |logit| <= 2 within 5 mm
    present = torch.tensor([[True, True], [True, False]])
    pts[1, 1, :10] = float("nan")  # the absent hand's candidates may be garbage
    anchors = sample_anchors(pts, logits, present, num=64, band=2.0)
    assert anchors.shape == (b, 2, 64, 3)
    assert bool(torch.isfinite(anchors).all())
    r_a = (anchors[present] - center).norm(dim=-1)
    assert float((r_a - r0).abs().max()) <= 0.005 + 1e-6
    # Spread: the 64 anchors are far apart compared with random points of the band.
    band_pts = pts[0, 0][(logits[0, 0].abs() <= 2)]
    assert _min_pairwise(anchors[0, 0]) > 2 * _min_pairwise(band_pts[:64])
    # A too-narrow band still returns the lowest-|logit| candidates.
    narrow = sample_anchors(pts, logits, present, num=32, band=0.0)
    assert float(((narrow[0, 0] - center).norm(dim=-1) - r0).abs().max()) < 0.005
    with pytest.raises(ValueError):
        sample_anchors(pts, logits, present, num=p + 1)


def test_overlap_indices_pick_each_hands_points_inside_the_other():
    gen = torch.Generator().manual_seed(1)
    b, c, r0 = 1, 4000, 0.05
    centres = torch.tensor([[0.0, 0.0, 0.5], [0.07, 0.0, 0.5]])  # spheres 7 cm apart: a lens
    cand = centres[:, None] + 0.08 * (2 * torch.rand(b, 2, c, 3, generator=gen) - 1)
    queries = cand.reshape(b, 2 * c, 3)  # hand 0's candidates first
    dist = (queries[:, None] - centres[None, :, None]).norm(dim=-1)  # [B, 2, 2C]
    logits = (r0 - dist) * 400.0
    picked = overlap_indices(logits, torch.ones(b, 2, dtype=torch.bool), num=50)
    assert picked.shape == (b, 2, 50) and picked.dtype == torch.int64
    for h in (0, 1):
        pts = cand[0, h, picked[0, h]]
        inside = ((pts[:, None] - centres[None]).norm(dim=-1) < r0 + 0.002).all(dim=1)
        assert bool(inside.all()), f"hand {h}: {int((~inside).sum())} points outside the lens"
        assert len(set(picked[0, h].tolist())) == 50
    # the lens is a small part of each hand's box: chance alone would not pick only lens points
    lens = ((cand[0, 0, :, None] - centres[None]).norm(dim=-1) < r0).all(dim=1)
    assert int(lens.sum()) < 0.2 * c
    with pytest.raises(ValueError, match="num"):
        overlap_indices(logits, torch.ones(b, 2, dtype=torch.bool), num=c + 1)


# ---------------------------------------------------------------------------- real data


def test_refinement_learns_on_real_scenes(tiny_dataset_dir):
    from im2hands_model.data.shards import ShardDataset

    torch.manual_seed(0)
    ds = ShardDataset(tiny_dataset_dir)
    items = [ds[i] for i in range(4)]  # scene 3 of the tiny set has one hand only (any is ok)
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    b = len(items)
    present = batch["hand_present"]
    n_per_hand = 384
    gen = torch.Generator().manual_seed(0)

    # Anchors from the GT meshes (FPS 256 per hand); the centre is the mean of present wrists.
    verts = batch["vertices"].reshape(b * 2, -1, 3)
    anchors = gather_points(verts, farthest_point_sample(verts, 256)).reshape(b, 2, 256, 3)
    w = present.float()[..., None]
    center = (batch["norm_origin"] * w).sum(1) / w.sum(1).clamp_min(1)
    image, K = batch["image"], batch["K"]

    enc = _encoder()
    r = _refiner(num_anchors=256)
    opt = torch.optim.Adam([*r.parameters(), *enc.parameters()], lr=2e-3)
    losses = []
    for _ in range(40):
        sel = torch.stack(
            [torch.randperm(batch["occ_points"].shape[2], generator=gen)[:n_per_hand]
             for _ in range(2)]
        )  # fmt: skip
        pts_n = batch["occ_points"][:, torch.arange(2)[:, None], sel]  # [B, 2, n, 3]
        labels = batch["occ_labels"][:, torch.arange(2)[:, None], sel]  # [B, 2, n]
        cam = from_normalized(pts_n, batch["norm_rot"], batch["norm_origin"])
        queries = cam.reshape(b, 2 * n_per_hand, 3)
        hand = torch.arange(2).repeat_interleave(n_per_hand)[None].expand(b, -1)
        # Stand-in for I: blurred GT labels (own hand's label where known, 0 elsewhere).
        own = torch.zeros(b, 2, 2 * n_per_hand)
        own[:, 0, :n_per_hand] = labels[:, 0]
        own[:, 1, n_per_hand:] = labels[:, 1]
        init = own * 4 - 2 + 1.5 * torch.randn(b, 2, 2 * n_per_hand, generator=gen)

        out = r(queries, init, anchors, present, K, enc(image), center)
        # BCE on each hand's own (labelled) points of the present hands.
        own_mask = (hand[:, None, :] == torch.arange(2)[None, :, None]) & present[..., None]
        loss = F.binary_cross_entropy_with_logits(out[own_mask], own[own_mask])
        loss = loss + 1e-3 * penetration_loss(out, hand, present)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert math.isfinite(losses[-1])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last, losses)


def test_features_object_shape_checks():
    r = _refiner()
    queries, init, anchors, K, _, center = _scene()
    present = torch.ones(2, 2, dtype=torch.bool)
    bad = ImageFeatures(fmap=torch.zeros(2, 8, 16, 16), global_code=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="channels"):
        r(queries, init, anchors, present, K, bad, center)
    # No image at all (feats=None) works: zero image features.
    _perturb_last_layer(r)
    out = r(queries, init, anchors, present, K, None, center)
    assert bool(torch.isfinite(out).all())
    assert out.shape == (2, 2, queries.shape[1])


def test_empty_batch_and_no_queries():
    r = _refiner()
    out = r(
        torch.zeros(0, 10, 3), torch.zeros(0, 2, 10), torch.zeros(0, 2, 64, 3),
        torch.zeros(0, 2, dtype=torch.bool), torch.zeros(0, 3, 3), None, torch.zeros(0, 3),
    )  # fmt: skip
    assert out.shape == (0, 2, 10)
    queries, init, anchors, K, _, center = _scene()
    present = torch.ones(2, 2, dtype=torch.bool)
    out = r(queries[:, :0], init[..., :0], anchors, present, K, None, center)
    assert out.shape == (2, 2, 0)


def test_decoder_split_and_per_hand_queries_give_the_shared_decode():
    """decode = decode_head(decode(..., return_features=True)); per-hand queries [B, 2, Q, 3]
    score each hand at its own points, and ``hand=`` scores one hand alone, all equal to the
    shared-query decode."""
    torch.manual_seed(0)
    queries, init, anchors, K, image, center = _scene()
    enc, r = _encoder(), _refiner()
    _perturb_last_layer(r)
    feats = enc(image)
    present = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        ctx = r.encode_context(anchors, present, K, feats, center)
        full = r.decode(queries, init, ctx, K, feats, center)
        smooth = r.decode(queries, init, ctx, K, feats, center, return_features=True)
        torch.testing.assert_close(r.decode_head(smooth, init, present), full)
        per_hand = queries[:, None].expand(-1, 2, -1, -1)
        torch.testing.assert_close(r.decode(per_hand, init, ctx, K, feats, center), full)
        for h in (0, 1):
            one = r.decode(queries[:, None], init[:, h : h + 1], ctx, K, feats, center, hand=h)
            torch.testing.assert_close(one[:, 0], full[:, h])
