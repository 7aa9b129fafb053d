"""Cut detection against PySceneDetect on generated videos with known hard cuts, dissolves and fades,
same videos, same run; then the whole curation pipeline's clips/s per core.

    python bench/curate.py                 # 16 videos of 6 shots at 480×270, 24 fps
    python bench/curate.py --videos 32 --size 720 1280

Shots alternate a camera pan over a texture, a zoom into another texture and an object moving over a
gradient; transitions are hard cuts, dissolves and fades through black of 8–30 frames. A detection is
right if it falls within the true transition's frames ± 2. Speed is reported one video at a time and
with every detector in the same process pool (one process per core), which is how curation runs.

PySceneDetect is installed without its `opencv-python` dependency (it runs on our headless OpenCV):
`pip install --no-deps scenedetect click platformdirs` (`make bench` does this).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from svd.curate.config import CurateConfig
from svd.curate.cuts import Transition, detect_transitions, match
from svd.curate.pipeline import run
from svd.curate.scan import scan
from svd.data.synthetic import moving_square, panning_texture, video_with_cuts, zooming_texture
from svd.data.video_io import encode_mp4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--shots", type=int, default=6, help="shots per video")
    p.add_argument("--size", type=int, nargs=2, default=[270, 480], metavar=("H", "W"))
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_videos(args: argparse.Namespace, folder: Path) -> list[tuple[str, list[tuple[int, int]]]]:
    rng = np.random.default_rng(args.seed)
    height, width = args.size

    def shot(kind: int, n: int) -> np.ndarray:
        seed = int(rng.integers(1 << 30))
        if kind == 0:
            return panning_texture(
                n, height, width, velocity=(rng.uniform(-1, 1), rng.uniform(-4, 4)), seed=seed
            )
        if kind == 1:
            return zooming_texture(n, height, width, rate=rng.uniform(-0.015, 0.015), seed=seed)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        return moving_square(n, height, width, color=color, velocity=(rng.uniform(-2, 2), rng.uniform(-4, 4)))

    videos = []
    for v in range(args.videos):
        shots = [shot((v + i) % 3, int(rng.integers(60, 150))) for i in range(args.shots)]
        kinds = rng.choice(["cut", "dissolve", "fade"], size=args.shots - 1)
        transitions = [(str(k), 0 if k == "cut" else int(rng.integers(8, 31))) for k in kinds]
        frames, truth = video_with_cuts(shots, transitions)
        path = folder / f"v{v:03d}.mp4"
        path.write_bytes(encode_mp4(frames, args.fps))
        videos.append((str(path), truth))
    return videos


def ours(path: str) -> list[Transition]:
    import av

    with av.open(path) as container:
        fps = float(container.streams.video[0].average_rate)
    return detect_transitions(scan(path).thumbnails, fps)


def _scenedetect(path: str, detector_name: str) -> list[Transition]:
    from scenedetect import AdaptiveDetector, ContentDetector, detect

    detector = {"ContentDetector": ContentDetector, "AdaptiveDetector": AdaptiveDetector}[detector_name]()
    scenes = detect(path, detector)
    return [Transition(start.get_frames(), start.get_frames() - 1) for start, _ in scenes[1:]]


def content_detector(path: str) -> list[Transition]:
    return _scenedetect(path, "ContentDetector")


def adaptive_detector(path: str) -> list[Transition]:
    return _scenedetect(path, "AdaptiveDetector")


DETECTORS = {"ours": ours, "ContentDetector": content_detector, "AdaptiveDetector": adaptive_detector}


def evaluate(detector, videos, pool: ProcessPoolExecutor | None) -> dict[str, float]:
    paths = [p for p, _ in videos]
    start = time.perf_counter()
    found = list(pool.map(detector, paths)) if pool else [detector(p) for p in paths]
    seconds = time.perf_counter() - start
    tp, fp, fn = np.sum(
        [match(f, truth, tolerance=2) for f, (_, truth) in zip(found, videos, strict=True)], axis=0
    )
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    return {"precision": precision, "recall": recall, "f1": f1, "videos_per_s": len(paths) / seconds}


def print_results(results: dict[str, dict[str, float]], processes: int) -> None:
    pool = f"pool of {processes}"
    print(f"{'detector':18s} {'P':>5s} {'R':>5s} {'F1':>5s} {'videos/s':>9s} {pool:>11s}")
    for name, r in results.items():
        scores = f"{r['precision']:5.2f} {r['recall']:5.2f} {r['f1']:5.2f}"
        print(f"{name:18s} {scores} {r['videos_per_s']:9.2f} {r['pooled_videos_per_s']:11.2f}")
    ours_ = results["ours"]
    for baseline in ("ContentDetector", "AdaptiveDetector"):
        b = results[baseline]
        alone = ours_["videos_per_s"] / b["videos_per_s"]
        pooled = ours_["pooled_videos_per_s"] / b["pooled_videos_per_s"]
        f1 = f"F1 {ours_['f1']:.2f} vs {b['f1']:.2f}"
        print(f"vs {baseline}: {f1}; speed ×{alone:.2f} one at a time, ×{pooled:.2f} pooled")


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        videos = make_videos(args, folder)
        transitions = sum(len(t) for _, t in videos)
        size = f"{args.size[1]}×{args.size[0]}"
        print(f"{args.videos} videos {size} @ {args.fps:g} fps, {transitions} cuts, dissolves and fades")
        results = {}
        for name, detector in DETECTORS.items():
            sequential = evaluate(detector, videos, None)
            with ProcessPoolExecutor(args.processes) as pool:
                pool.submit(detector, videos[0][0]).result()  # start and warm the workers
                pooled = evaluate(detector, videos, pool)
            results[name] = sequential | {"pooled_videos_per_s": pooled["videos_per_s"]}
        print_results(results, args.processes)

        output = str(folder / "clips.lance")
        start = time.perf_counter()
        summary = run(CurateConfig(input=str(folder), output=output, workers=args.processes), progress=False)
        seconds = time.perf_counter() - start
        per_core = summary.clips / seconds / args.processes
        print(
            f"whole pipeline (probe, cuts, motion, text area, captions; no CLIP model), {args.processes} "
            f"workers: {summary.clips} clips from {summary.curated} videos in {seconds:.1f} s = "
            f"{per_core:.2f} clips/s per core"
        )


if __name__ == "__main__":
    main()
