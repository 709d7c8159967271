"""The tooling behind the shipped weights, on tiny real runs: warm starts, dataset lists,
augmentation, K trained on a predictor's output, evaluation with predicted keypoints, and the
export -> manifest -> load_pretrained round trip."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_stages import _cfg

from im2hands_model.training.augment import photometric
from im2hands_model.training.config import ConfigError
from im2hands_model.training.data import build_dataset
from im2hands_model.training.engine import train

ROOT = Path(__file__).resolve().parents[1]
OCC = ["data.points_per_hand=128", "model.hidden=16"]
REFINE = [
    "data.points_per_hand=128",
    "model.refine={dim: 16, num_anchors: 32, latent_dim: 16, hidden: 16}",
    "model.anchor_candidates=128",
]


@pytest.fixture(scope="module")
def runs(tiny_dataset_dir, tmp_path_factory) -> dict[str, Path]:
    """One tiny run of every shipped network (K trained on the predictor's output)."""
    root = tmp_path_factory.mktemp("runs")
    d = tiny_dataset_dir
    out = {name: root / name for name in ("kpts_pred", "kpts_ref", "halo", "init_occ", "ref_occ")}
    geometric = ["data.augment.mirror=0.5", "data.augment.rotate=30"]
    train(_cfg("kpts_pred", d, out["kpts_pred"], 6, ["model.input_size=64", *geometric]))
    pred = out["kpts_pred"] / "best.pt"
    train(
        _cfg(
            "kpts_ref",
            d,
            out["kpts_ref"],
            4,
            [
                f"init.kpts_pred_checkpoint={pred}",
                "loss.sigma_mm=2",
                "loss.global_mm=2",
                "loss.predictor_fraction=0.5",
            ],
        )
    )
    train(_cfg("init_occ", d, out["halo"], 4, [*OCC, "model.image_conditioning=false"]))
    train(_cfg("init_occ", d, out["init_occ"], 4, OCC))
    train(
        _cfg(
            "ref_occ",
            d,
            out["ref_occ"],
            3,
            [*REFINE, f"init.init_occ_checkpoint={out['init_occ'] / 'best.pt'}"],
        )
    )
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_warm_start_takes_the_weights_and_starts_a_fresh_schedule(runs, tiny_dataset_dir, tmp_path):
    src = runs["kpts_pred"] / "best.pt"
    out = tmp_path / "warm"
    result = train(
        _cfg(
            "kpts_pred",
            tiny_dataset_dir,
            out,
            1,
            ["model.input_size=64", f"train.init_weights={src}", "train.lr=1.0e-12"],
        )
    )
    assert result["step"] == 1  # a new run: its own step count, not the source's
    a, b = _state(src), _state(out / "last.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "weights not carried over"
    # a free_slots predictor warm-starts from the same run: only its new handedness head is
    # not in the file (and starts as initialised)
    slots = tmp_path / "slots"
    extra = ["model.input_size=64", "model.free_slots=true", "train.lr=1.0e-12"]
    train(_cfg("kpts_pred", tiny_dataset_dir, slots, 1, [*extra, f"train.init_weights={src}"]))
    c = _state(slots / "last.pt")
    assert {k for k in c if k not in a} == {k for k in c if k.startswith("handedness.")} != set()
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_warm_start_of_r_keeps_the_new_i(runs, tiny_dataset_dir, tmp_path):
    """R warm-started from a run on another I: R's weights carried, I's the newly given ones."""
    other_i = tmp_path / "other_i"
    train(_cfg("init_occ", tiny_dataset_dir, other_i, 2, [*OCC, "seed=5"]))
    out = tmp_path / "r2"
    train(
        _cfg(
            "ref_occ",
            tiny_dataset_dir,
            out,
            1,
            [
                *REFINE,
                f"init.init_occ_checkpoint={other_i / 'best.pt'}",
                f"train.init_weights={runs['ref_occ'] / 'best.pt'}",
                "train.lr=1.0e-12",
            ],
        )
    )
    new, old, new_i = (
        _state(out / "last.pt"),
        _state(runs["ref_occ"] / "best.pt"),
        _state(other_i / "best.pt"),
    )
    for k, v in new.items():
        if k.startswith("init."):
            assert torch.equal(v, new_i[k[len("init.") :]]), k
        else:
            assert torch.allclose(v, old[k], atol=1e-6), k


def test_warm_start_from_another_stage_is_refused(runs, tiny_dataset_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not fit stage 'kpts_pred'"):
        train(
            _cfg(
                "kpts_pred",
                tiny_dataset_dir,
                tmp_path / "x",
                1,
                [f"train.init_weights={runs['halo'] / 'best.pt'}"],
            )
        )
    with pytest.raises(ConfigError, match="init_weights"):
        train(
            _cfg(
                "kpts_pred",
                tiny_dataset_dir,
                tmp_path / "y",
                1,
                [f"train.init_weights={tmp_path / 'missing.pt'}"],
            )
        )


def test_a_list_of_dataset_folders_reads_as_one(tiny_dataset_dir):
    one = build_dataset(_cfg("init_occ", tiny_dataset_dir, Path("unused"), 1, []), "train")
    cfg = _cfg(
        "init_occ",
        tiny_dataset_dir,
        Path("unused"),
        1,
        [f"data.train=[{tiny_dataset_dir},{tiny_dataset_dir}]"],
    )
    both = build_dataset(cfg, "train")
    assert len(both) == 2 * len(one)
    assert torch.equal(both[len(one)]["joints_3d"], one[0]["joints_3d"])
    with pytest.raises(ConfigError, match=r"data.train\[1\]"):
        _cfg(
            "init_occ",
            tiny_dataset_dir,
            Path("unused"),
            1,
            [f"data.train=[{tiny_dataset_dir},/nonexistent/ds]"],
        )


def test_photometric_augmentation_is_repeatable_bounded_and_optional():
    images = torch.rand(4, 3, 16, 16)
    assert photometric(images, torch.Generator().manual_seed(0)) is images
    a = photometric(images, torch.Generator().manual_seed(1), colour=0.3, noise=0.02)
    b = photometric(images, torch.Generator().manual_seed(1), colour=0.3, noise=0.02)
    c = photometric(images, torch.Generator().manual_seed(2), colour=0.3, noise=0.02)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and (a - images).abs().mean() > 0.005


def test_k_on_the_predictor_sees_the_predictor_output(runs):
    """K's validation input is the frozen predictor's output: its input error equals the
    predictor's own validation error on the same batches."""
    pred = json.loads((runs["kpts_pred"] / "val_log.jsonl").read_text().splitlines()[-1])
    kref = json.loads((runs["kpts_ref"] / "val_log.jsonl").read_text().splitlines()[-1])
    ckpt_pred = torch.load(runs["kpts_pred"] / "best.pt", weights_only=True)
    assert ckpt_pred["step"] == pred["step"]
    assert kref["metrics"]["mpjpe_in_mm"] == pytest.approx(pred["metrics"]["mpjpe_mm"], rel=1e-5)
    k_state = _state(runs["kpts_ref"] / "best.pt")
    assert not any(k.startswith("predictor") for k in k_state), "predictor saved inside K"


def _evaluate(out: Path, data: Path, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "training" / "evaluate.py"),
        "--data",
        str(data),
        "--scenes",
        "3",
        "--resolution",
        "12",
        "--upsampling-steps",
        "1",
        "--n-iou",
        "2000",
        "--n-chamfer",
        "1000",
        "--pictures",
        "1",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _rounded(tree: object) -> object:
    """``tree`` with every float to 5 significant digits (nested dicts and lists)."""
    if isinstance(tree, dict):
        return {k: _rounded(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_rounded(v) for v in tree]
    return float(f"{tree:.5g}") if isinstance(tree, float) else tree


def _assert_close(a: object, b: object, rel: float, where: str = "") -> None:
    """Equal trees, floats within ``rel`` (meshes of keypoints that differ in their last bits
    differ a little more: marching cubes moves with them)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], rel, f"{where}/{k}")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-9), where
    else:
        assert a == b, where


def test_evaluate_with_predicted_keypoints_and_parallel_jobs(runs, tiny_dataset_dir, tmp_path):
    ckpts = []
    for name in ("kpts_pred", "kpts_ref", "halo", "init_occ", "ref_occ"):
        ckpts += ["--checkpoint", str(runs[name] / "best.pt")]
    ckpts += ["--keypoint-scenes", "6"]
    one = _evaluate(tmp_path / "one", tiny_dataset_dir, ckpts)
    cache = tmp_path / "cache"
    two = _evaluate(
        tmp_path / "two", tiny_dataset_dir, [*ckpts, "--jobs", "2", "--cache", str(cache)]
    )
    # the same figures; float32 networks in other processes may differ in the last bits
    assert _rounded(two["keypoints"]) == _rounded(one["keypoints"])
    # --cache: every scene's scores were kept; a second run reuses them and gives the same table
    assert len(list(cache.glob("scene_*.json"))) == 6
    again = _evaluate(tmp_path / "again", tiny_dataset_dir, [*ckpts, "--cache", str(cache)])
    assert again["variants"] == two["variants"] and again["keypoints"] == two["keypoints"]
    other = subprocess.run(
        [sys.executable, str(ROOT / "training" / "evaluate.py"), "--data", str(tiny_dataset_dir),
         "--out", str(tmp_path / "x"), "--cache", str(cache), "--seed", "5", *ckpts],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert other.returncode != 0 and "other settings" in other.stderr
    kp = one["keypoints"]
    assert kp["scenes"] == 6
    assert set(kp["sources"]) == {"pred. kpts", "pred. kpts + K", "noisy kpts", "noisy kpts + K"}
    assert kp["sources"]["pred. kpts"]["mpjpe_mm"] > 1.0
    assert kp["sources"]["pred. kpts"]["n_hands"] >= one["variants"]["I"]["n_hands"]
    names = list(one["variants"])
    assert names == [
        "HALO",
        "I",
        "I+R",
        "HALO on pred. kpts",
        "I on pred. kpts",
        "I+R on pred. kpts",
        "HALO on pred. kpts + K",
        "I on pred. kpts + K",
        "I+R on pred. kpts + K",
        "GT meshes",
    ], names
    # float32 networks in worker processes (other thread counts) differ in the last bits, so the
    # predicted-keypoint rows agree to ~1e-5 (MPJPE) and ~1e-4 (Chamfer), not exactly (measured)
    _assert_close(one["variants"], two["variants"], 1e-3, "results depend on --jobs")
    rows = one["variants"]
    assert rows["I"]["mpjpe_mm"] == 0.0 and rows["I on pred. kpts"]["mpjpe_mm"] > 1.0
    assert rows["GT meshes"]["contact_cm2"] is not None and rows["GT meshes"]["iou"] is None
    for name in names[:-1]:
        assert rows[name]["contact_cm2"] is not None and rows[name]["contact_cm2"] >= 0, name
    assert "Contact (cm²)" in (tmp_path / "one" / "results.md").read_text()


def test_evaluation_cache_recomputes_only_the_rows_of_changed_weights(
    runs, tiny_dataset_dir, tmp_path
):
    """A retrained predictor: the cached rows of GT keypoints are reused as they are, the rows
    that depend on the predictor (and the keypoint errors) are computed again."""
    import shutil

    folder = tmp_path / "ckpts"
    folder.mkdir()
    ckpts = []
    for name in ("kpts_pred", "kpts_ref", "halo", "init_occ", "ref_occ"):
        shutil.copy(runs[name] / "best.pt", folder / f"{name}.pt")
        ckpts += ["--checkpoint", str(folder / f"{name}.pt")]
    cache = tmp_path / "cache"
    extra = [*ckpts, "--keypoint-scenes", "4", "--pictures", "0", "--cache", str(cache)]
    first = _evaluate(tmp_path / "first", tiny_dataset_dir, extra)
    assert len(list(cache.glob("scene_*.json"))) == 4
    # a marker in one cached row: it survives only if that row is reused, not recomputed
    marked = cache / "scene_000000.json"
    rec = json.loads(marked.read_text())
    row = next(r for r in rec["hands"] if r[0] == "I")
    row[1]["iou"] = 12.5
    marked.write_text(json.dumps(rec))
    before = {p.name: json.loads(p.read_text()) for p in cache.glob("scene_*.json")}

    ckpt = torch.load(folder / "kpts_pred.pt", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    ckpt["model"] = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if k.endswith("weight") else v
        for k, v in ckpt["model"].items()
    }
    torch.save(ckpt, folder / "kpts_pred.pt")
    second = _evaluate(tmp_path / "second", tiny_dataset_dir, extra)

    for name in ("HALO", "I+R", "GT meshes"):
        assert second["variants"][name] == first["variants"][name], name
    pred_rows = [n for n in first["variants"] if "pred. kpts" in n]
    assert len(pred_rows) == 6
    assert any(second["variants"][n] != first["variants"][n] for n in pred_rows)
    sources = [s["keypoints"]["sources"]["pred. kpts"] for s in (first, second)]
    assert sources[0] != sources[1]
    for path in cache.glob("scene_*.json"):
        old, new = before[path.name], json.loads(path.read_text())
        digests = [r["digests"]["variants"] for r in (old, new)]
        assert digests[0].get("I") == digests[1].get("I")
        if new["index"] < 3:  # meshed scenes: the predictor's rows have new digests
            assert digests[0]["I on pred. kpts"] != digests[1]["I on pred. kpts"]
            assert [r for r in new["hands"] if r[0] == "I"] == [
                r for r in old["hands"] if r[0] == "I"
            ]
    assert next(r for r in json.loads(marked.read_text())["hands"] if r[0] == "I")[1]["iou"] == 12.5
    # a third run finds every scene up to date: nothing is written again
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("scene_*.json")}
    third = _evaluate(tmp_path / "third", tiny_dataset_dir, extra)
    assert third["variants"] == second["variants"]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in cache.glob("scene_*.json")}


def test_export_manifest_and_load_pretrained_round_trip(runs, tiny_dataset_dir, tmp_path):
    from im2hands_model.pretrained import WeightsError, load_pretrained, manifest
    from im2hands_model.training.export import main as export_main

    weights = tmp_path / "weights"
    args = []
    for name, run in runs.items():
        args += [f"--{name.replace('_', '-')}", str(run / "best.pt")]
    assert export_main([*args, "--out", str(weights)]) == 0
    man = manifest(weights)
    assert set(man["models"]) == set(runs)
    seed = json.loads((tiny_dataset_dir / "report.json").read_text())["seed"]
    for name, entry in man["models"].items():
        rounds = entry["training"]["rounds"]
        assert rounds[-1]["train_data"][0]["seed"] == seed, name
        assert entry["training"]["total_steps"] == rounds[-1]["steps"] > 0
        # best.pt: its own validation value is the run's best (a last.pt would differ)
        best = {k: v for k, v in rounds[-1]["best_val"].items() if k != "step"}
        assert rounds[-1]["checkpoint"] == "best.pt", name
        assert rounds[-1]["val"] == pytest.approx(next(iter(best.values()))), name
        net = load_pretrained(name, weights_dir=weights)
        state = _state(runs[name] / "best.pt")
        for k, v in net.state_dict().items():
            if name == "ref_occ" and k.startswith("init."):
                v_ref = _state(runs["init_occ"] / "best.pt")[k[len("init.") :]]
            else:
                v_ref = state[k]
            assert torch.equal(v, v_ref), (name, k)
        assert not net.training
    r_keys = load_file(str(weights / "ref_occ.safetensors"))
    assert r_keys and not any(k.startswith("init.") for k in r_keys), "I shipped twice"

    # the evaluation of exported weights equals that of the checkpoints
    from_ckpts = _evaluate(
        tmp_path / "ckpt",
        tiny_dataset_dir,
        [a for n in runs for a in ("--checkpoint", str(runs[n] / "best.pt"))],
    )
    shipped = _evaluate(tmp_path / "shipped", tiny_dataset_dir, ["--pretrained", str(weights)])
    assert shipped["variants"] == from_ckpts["variants"]

    # a damaged file is named, not loaded
    blob = bytearray((weights / "halo.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (weights / "halo.safetensors").write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="halo.safetensors"):
        load_pretrained("halo", weights_dir=weights)
    with pytest.raises(ValueError, match="unknown network"):
        load_pretrained("nope", weights_dir=weights)
    with pytest.raises(WeightsError, match="manifest"):
        load_pretrained("halo", weights_dir=tmp_path / "empty")


def test_one_retrained_network_ships_beside_the_kept_ones(runs, tiny_dataset_dir, tmp_path):
    """Export one network, keep the others: a K warm-started from the shipped file lists that
    file's rounds before its own, and the other four files and entries stay as they were."""
    from im2hands_model.pretrained import load_pretrained, manifest
    from im2hands_model.training.export import main as export_main

    weights = tmp_path / "weights"
    args = [a for n, r in runs.items() for a in (f"--{n.replace('_', '-')}", str(r / "best.pt"))]
    assert export_main([*args, "--out", str(weights), "--notes", "first"]) == 0
    before = manifest(weights)
    again = tmp_path / "kref2"
    train(_cfg("kpts_ref", tiny_dataset_dir, again, 3,
               [f"train.init_weights={weights / 'kpts_ref.safetensors'}"]))  # fmt: skip
    assert export_main(["--kpts-ref", str(again / "best.pt"), "--out", str(weights)]) == 0
    after = manifest(weights)
    for name in ("kpts_pred", "halo", "init_occ", "ref_occ"):
        assert after["models"][name] == before["models"][name], name
    rounds = after["models"]["kpts_ref"]["training"]["rounds"]
    assert rounds[:-1] == before["models"]["kpts_ref"]["training"]["rounds"]
    assert rounds[-1]["run"] == str(again) and after["notes"] == "first"
    net = load_pretrained("kpts_ref", weights_dir=weights)  # checksum verified on load
    assert torch.equal(next(iter(net.state_dict().values())),
                       next(iter(_state(again / "best.pt").values())))  # fmt: skip
    assert export_main(["--kpts-ref", str(again / "best.pt"), "--out", str(tmp_path / "none")]) == 2


def test_r_ships_with_the_iso_level_chosen_on_validation(runs, tiny_dataset_dir, tmp_path):
    """``--iso-level-r`` reads evaluate.py runs at several levels, records the best-IoU level
    with R's entry, and the pipeline and evaluate.py then mesh I+R there unless told a level;
    a newly exported R drops it, and results of different scenes are refused."""
    from im2hands_model.pipeline.model import Im2Hands
    from im2hands_model.pretrained import iso_level, manifest
    from im2hands_model.training.export import ISO_LEVEL_TIE_IOU
    from im2hands_model.training.export import main as export_main

    weights = tmp_path / "weights"
    args = [a for n, r in runs.items() for a in (f"--{n.replace('_', '-')}", str(r / "best.pt"))]
    assert export_main([*args, "--out", str(weights)]) == 0
    assert iso_level("ref_occ", weights) is None
    sweep, rows = [], {}
    for level in (0.35, 0.6):
        out = tmp_path / f"val_{level}"
        res = _evaluate(out, tiny_dataset_dir, ["--pretrained", str(weights), "--networks",
                                                "init_occ,ref_occ", "--threshold-r", str(level)])
        sweep.append(str(out))
        rows[level] = res["variants"]["I+R"]
    assert rows[0.35]["iou"] != rows[0.6]["iou"], "the levels gave the same meshes"
    assert export_main(["--iso-level-r", *sweep, "--out", str(weights)]) == 0
    best = max(r["iou"] for r in rows.values())
    tied = [lv for lv, r in rows.items() if r["iou"] >= best - ISO_LEVEL_TIE_IOU]
    want = min(tied, key=lambda lv: rows[lv]["penetration_cm3"])
    entry = manifest(weights)["models"]["ref_occ"]["iso_level"]
    assert entry["value"] == want and len(entry["candidates"]) == 2
    assert Im2Hands.from_pretrained(weights, device="cpu").config.threshold_r == want
    assert Im2Hands.from_pretrained(weights, device="cpu", threshold_r=0.5).config.threshold_r \
        == 0.5
    default = _evaluate(tmp_path / "default", tiny_dataset_dir,
                        ["--pretrained", str(weights), "--networks", "init_occ,ref_occ"])
    assert default["settings"]["threshold_r"] == want
    assert default["variants"]["I+R"] == rows[want]

    other = json.loads((Path(sweep[1]) / "results.json").read_text())
    other["settings"]["data"] = "elsewhere"
    (Path(sweep[1]) / "results.json").write_text(json.dumps(other))
    assert export_main(["--iso-level-r", *sweep, "--out", str(weights)]) == 2
    assert export_main(["--ref-occ", str(runs["ref_occ"] / "best.pt"), "--out", str(weights)]) == 0
    assert iso_level("ref_occ", weights) is None  # chosen for the previous R
