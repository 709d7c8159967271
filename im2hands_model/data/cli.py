"""``im2hands-data``: dataset commands.

im2hands-data synth --n N --seed S --out DIR [--workers W] [--points-per-hand P]
                    [--image-size S] [--full-frame] [--skin-cues] [--realism] [--shard-size K]
                    [--overwrite]
im2hands-data detect DIR [--workers W] [--variant full|lite]
im2hands-data convert-mano MANO_DIR OUT_DIR
im2hands-data interhand --root IH26M --mano MANO_NPZ_DIR --split train|val|test --out DIR
                        [--max-frames N] [--points-per-hand P] [--image-size S] [--shard-size K]
                        [--workers W] [--seed S] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _int_at_least(name: str, minimum: int):
    """An argparse type: an integer >= ``minimum``, with a message naming the option."""
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {value}")
        return value

    return parse


def _positive(name: str):
    return _int_at_least(name, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="im2hands-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser(
        "synth",
        help="generate synthetic two-hand scenes on the Anny hand model",
        description="Generate a deterministic synthetic two-hand dataset (shards, report.json, "
        "contact_sheet.png) on the Anny hand model.",
    )
    synth.add_argument("--n", type=_positive("--n"), required=True, help="number of scenes")
    seed_type = _int_at_least("--seed", 0)
    synth.add_argument("--seed", type=seed_type, required=True, help="dataset seed")
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    _add_shard_options(synth, "scenes")
    synth.add_argument(
        "--full-frame",
        action="store_true",
        help="also render the full 640x480 camera frame of each scene",
    )
    synth.add_argument(
        "--skin-cues",
        action="store_true",
        help="lighter palms and nails (tell palm from back, i.e. which hand is which; the "
        "shipped weights were trained without)",
    )
    synth.add_argument(
        "--realism",
        action="store_true",
        help="body-anchored views, arms, photo backgrounds (Debian's mate-backgrounds), light "
        "with shadows and camera effects; implies --skin-cues (the shipped weights were "
        "trained without)",
    )
    synth.add_argument("--no-contact-sheet", action="store_true", help="skip contact_sheet.png")
    detect = sub.add_parser(
        "detect",
        help="store the default keypoint source's output with each scene (K's real inputs)",
        description="Run the MediaPipe keypoint source over every scene of a dataset (on the "
        "full frame when it has one) and store the hands it finds with the scenes "
        "(src_* keys; im2hands_model/training/detections.py). Resumes an interrupted run.",
    )
    detect.add_argument("dir", type=Path, help="a dataset folder (im2hands-data synth --out)")
    detect.add_argument("--workers", type=_positive("--workers"), default=os.cpu_count() or 1,
                        help="processes (default: one per core)")
    detect.add_argument("--variant", choices=("full", "lite"), default="full",
                        help="MediaPipe model variant")
    detect.add_argument("--quiet", action="store_true", help="no progress bar")
    mano = sub.add_parser(
        "convert-mano",
        help="convert the official MANO pickles to npz (no chumpy needed)",
        description="Convert MANO_RIGHT.pkl and MANO_LEFT.pkl (from mano_v1_2.zip, found in "
        "MANO_DIR or MANO_DIR/models) to MANO_RIGHT.npz and MANO_LEFT.npz in OUT_DIR, and check "
        "that they load (needs the mano extra: pip install 'im2hands_ros[mano]').",
    )
    mano.add_argument("mano_dir", type=Path, help="folder with the official MANO .pkl files")
    mano.add_argument("out_dir", type=Path, help="folder for the .npz files")
    _add_interhand_parser(sub)
    return parser


def _clear_dataset(out: Path) -> None:
    """Remove a dataset's own files from ``out`` (``--overwrite``); anything else stays."""
    import shutil

    for child in out.iterdir():
        if child.name.startswith(("shard_", ".shard_")) and child.is_dir():
            shutil.rmtree(child)
        elif child.name in ("index.json", "faces.npy", "report.json", "contact_sheet.png"):
            child.unlink()


def _add_shard_options(p: argparse.ArgumentParser, items: str) -> None:
    """Options every dataset writer shares (``items``: what a shard holds, for the help)."""
    p.add_argument(
        "--workers",
        type=_positive("--workers"),
        default=os.cpu_count() or 1,
        help="worker processes (default: the number of CPU cores)",
    )
    p.add_argument(
        "--points-per-hand",
        type=_positive("--points-per-hand"),
        default=16384,
        help="labelled occupancy points per hand (default 16384)",
    )
    p.add_argument(
        "--image-size",
        type=_positive("--image-size"),
        default=256,
        help="side of the square crop in pixels (default 256)",
    )
    p.add_argument(
        "--shard-size",
        type=_positive("--shard-size"),
        default=64,
        help=f"{items} per shard (default 64)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_interhand_parser(sub: argparse._SubParsersAction) -> None:
    ih = sub.add_parser(
        "interhand",
        help="convert InterHand2.6M v1.0 (5 fps) interacting frames to shards",
        description="Convert the interacting frames of one InterHand2.6M v1.0 split (annotations "
        "in ROOT/annotations/<split>/, images in ROOT/images/<split>/) into the shard format of "
        "the synthetic data: IntagHand-style crops, MANO meshes (sealed) and occupancy labels. "
        "Skipped frames are counted per reason in the printed summary, report.json and "
        "index.json.",
    )
    ih.add_argument("--root", type=Path, required=True, help="InterHand2.6M root folder")
    ih.add_argument(
        "--mano",
        type=Path,
        required=True,
        help="folder with MANO_RIGHT.npz / MANO_LEFT.npz (from im2hands-data convert-mano)",
    )
    ih.add_argument("--split", choices=("train", "val", "test"), required=True)
    ih.add_argument("--out", type=Path, required=True, help="output folder")
    ih.add_argument(
        "--max-frames",
        type=_positive("--max-frames"),
        default=None,
        help="convert at most the first N selected frames (default: all)",
    )
    _add_shard_options(ih, "frames")
    ih.add_argument(
        "--seed", type=_int_at_least("--seed", 0), default=0, help="occupancy sampling seed"
    )


def _convert_mano(args: argparse.Namespace) -> int:
    from im2hands_model.data.mano import ManoFileError, ManoModel, MissingSmplxError, convert_mano

    try:
        written = convert_mano(args.mano_dir, args.out_dir)
        for path in written:
            print(path)
        for side in ("right", "left"):  # load them as the readers will
            ManoModel.from_npz_dir(args.out_dir, side)
    except (ManoFileError, MissingSmplxError) as exc:
        print(f"im2hands-data: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_out_dir(out: Path, overwrite: bool) -> str | None:
    """An error message if ``out`` cannot take a new dataset, else None."""
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        return f"--out {out} is not empty; pass --overwrite to replace its dataset"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"cannot write to --out {out}: {exc.strerror or exc}"
    return None


def _synth(args: argparse.Namespace) -> int:
    from im2hands_model.data.render import Renderer, RenderUnavailableError

    error = _check_out_dir(args.out, args.overwrite)
    if error:
        print(f"im2hands-data: error: {error}", file=sys.stderr)
        return 2
    try:  # fail before starting workers when headless rendering is missing
        Renderer(16, 16).release()
    except RenderUnavailableError as exc:
        print(f"im2hands-data: error: {exc}", file=sys.stderr)
        return 3
    if args.overwrite:
        _clear_dataset(args.out)

    from im2hands_model.data.build import SynthSettings, build_dataset

    settings = SynthSettings(
        n=args.n,
        seed=args.seed,
        points_per_hand=args.points_per_hand,
        image_size=args.image_size,
        full_frame=args.full_frame,
        shard_size=args.shard_size,
        skin_cues=args.skin_cues,
        realism=args.realism,
    )
    workers = min(args.workers, args.n)
    report = build_dataset(settings, args.out, workers=workers, progress=not args.quiet)
    if not args.no_contact_sheet:
        from im2hands_model.data.contact_sheet import make_contact_sheet

        sheet = make_contact_sheet(args.out, args.out / "contact_sheet.png")
        print(f"contact sheet: {sheet}")
    print(f"report: {args.out / 'report.json'}")
    print(
        json.dumps(
            {k: report[k] for k in ("scenes", "shards", "seconds", "scenes_per_s", "layouts")}
        )
    )
    return 0


def _interhand(args: argparse.Namespace) -> int:
    import logging

    from im2hands_model.data.interhand import (
        ConvertSettings,
        InterHandConversionError,
        InterHandFormatError,
        convert_interhand,
    )
    from im2hands_model.data.mano import ManoFileError, MissingSmplxError

    if not args.mano.is_dir():
        print(
            f"im2hands-data: error: --mano {args.mano} is not a folder; make the MANO npz files "
            "with `im2hands-data convert-mano MANO_DIR OUT_DIR`",
            file=sys.stderr,
        )
        return 2
    error = _check_out_dir(args.out, args.overwrite)
    if error:
        print(f"im2hands-data: error: {error}", file=sys.stderr)
        return 2
    if args.overwrite:
        _clear_dataset(args.out)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    settings = ConvertSettings(
        points_per_hand=args.points_per_hand,
        image_size=args.image_size,
        shard_size=args.shard_size,
        seed=args.seed,
        max_frames=args.max_frames,
    )
    try:
        summary = convert_interhand(
            args.root, args.split, args.mano, args.out, settings, args.workers, not args.quiet
        )
    except (InterHandFormatError, ManoFileError, MissingSmplxError) as exc:
        print(f"im2hands-data: error: {exc}", file=sys.stderr)
        return 2
    except InterHandConversionError as exc:
        print(f"im2hands-data: error: {exc}", file=sys.stderr)
        return 1
    print(summary.format())
    print(f"report: {args.out / 'report.json'}")
    return 0


def _detect(args: argparse.Namespace) -> int:
    from im2hands_model.hand_tracking.models import ModelFileError
    from im2hands_model.hand_tracking.source import DetectorConfig
    from im2hands_model.training.detections import detect_dataset

    try:
        record = detect_dataset(args.dir, DetectorConfig(variant=args.variant),
                                workers=args.workers, progress=not args.quiet)  # fmt: skip
    except (FileNotFoundError, ModelFileError) as exc:
        print(f"im2hands-data: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: record[k] for k in ("scenes", "hands", "found", "extra", "found_pct",
                                              "image")}))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("WARP_LOG_LEVEL", "error")
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        return _synth(args)
    if args.command == "detect":
        return _detect(args)
    if args.command == "convert-mano":
        return _convert_mano(args)
    if args.command == "interhand":
        return _interhand(args)
    return 2  # pragma: no cover - argparse enforces the sub-command


if __name__ == "__main__":
    sys.exit(main())
