"""Generated videos whose content is known exactly: for the demo and for tests of every stage."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from svd.data.storage import Storage, join
from svd.data.video_io import encode_mp4


def moving_square(
    num_frames: int = 14,
    height: int = 32,
    width: int = 32,
    *,
    side: int | None = None,
    color: tuple[int, int, int] = (230, 60, 40),
    velocity: tuple[float, float] = (0.0, 1.0),
    start: tuple[float, float] | None = None,
) -> np.ndarray:
    """A coloured square gliding over a vertical gradient at `velocity` (rows, columns per frame),
    wrapping around the borders. Returns (T, H, W, 3) uint8."""
    side = side or max(2, min(height, width) // 4)
    r0, c0 = start if start is not None else ((height - side) / 2, 0.0)
    gradient = np.linspace(20, 90, height, dtype=np.float32)[:, None, None]
    background = np.broadcast_to(gradient * np.array([0.4, 0.6, 1.0], np.float32), (height, width, 3))
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        top, left = (r0 + velocity[0] * t) % height, (c0 + velocity[1] * t) % width
        inside = (((rows - round(top)) % height) < side) & (((cols - round(left)) % width) < side)
        frames[t] = np.where(inside[..., None], np.array(color, np.float32), background).astype(np.uint8)
    return frames


def panning_texture(
    num_frames: int,
    height: int,
    width: int,
    *,
    velocity: tuple[float, float] = (0.0, 2.0),
    seed: int = 0,
) -> np.ndarray:
    """A camera pan over a smooth random texture: `velocity` (rows, columns per frame) is the camera's
    motion, so content moves the opposite way. Textured like natural footage, so it compresses and decodes
    like it. Returns (T, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    travel = [int(np.ceil(abs(v) * (num_frames - 1))) for v in velocity]  # how far the window moves
    reach_h, reach_w = travel[0] + height + 1, travel[1] + width + 1
    coarse = rng.random((reach_h // 8 + 2, reach_w // 8 + 2, 3), dtype=np.float32)
    texture = np.kron(coarse, np.ones((8, 8, 1), np.float32))[:reach_h, :reach_w]  # blocky
    texture = (
        texture + np.roll(texture, 4, 0) + np.roll(texture, 4, 1) + np.roll(texture, (4, 4), (0, 1))
    ) / 4
    texture = (texture * 200 + rng.random(texture.shape, dtype=np.float32) * 40).astype(np.uint8)  # + grain
    origin = [0 if v >= 0 else reach for v, reach in zip(velocity, travel, strict=True)]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        top, left = round(origin[0] + velocity[0] * t), round(origin[1] + velocity[1] * t)
        frames[t] = texture[top : top + height, left : left + width]
    return frames


def synthetic_corpus(
    base_uri: str,
    storage: Storage,
    *,
    videos: int = 4,
    seconds: float = 3.0,
    fps: float = 8.0,
    size: tuple[int, int] = (32, 48),
    clip_seconds: float = 1.5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Writes `videos` mp4 files of moving squares under `base_uri` and returns clip-table rows that cut
    each into consecutive clips of `clip_seconds`. Colours, speeds and directions differ per video."""
    rng = np.random.default_rng(seed)
    num_frames = round(seconds * fps)
    height, width = size
    rows = []
    for v in range(videos):
        color = tuple(int(c) for c in rng.integers(60, 256, 3))
        velocity = (float(rng.uniform(-1.5, 1.5)), float(rng.uniform(-2.5, 2.5)))
        frames = moving_square(num_frames, height, width, color=color, velocity=velocity)
        uri = join(base_uri, f"video_{v:04d}.mp4")
        fs, path = storage.fsspec(uri)
        fs.pipe_file(path, encode_mp4(frames, fps, gop=int(fps)))
        for c, start in enumerate(np.arange(0.0, seconds - clip_seconds + 1e-9, clip_seconds)):
            rows.append(
                {
                    "clip_id": f"video_{v:04d}_{c:03d}",
                    "video_uri": uri,
                    "start_s": float(start),
                    "end_s": float(start + clip_seconds),
                    "fps": fps,
                    "width": width,
                    "height": height,
                    "num_frames": round(clip_seconds * fps),
                    "captions": [f"a square of colour {color} moving", f"video {v} clip {c}"],
                    "motion_score": float(np.hypot(*velocity)) / 4,
                    "aesthetic_score": float(rng.uniform(3, 7)),
                    "clip_score": float(rng.uniform(0.1, 0.4)),
                    "text_area": 0.0,
                    "camera_motion": "static",
                    "source": "synthetic",
                    "split": "train",
                }
            )
    return rows


def zooming_texture(
    num_frames: int, height: int, width: int, *, rate: float = 0.02, seed: int = 0
) -> np.ndarray:
    """A camera zoom on a random texture: `rate` > 0 zooms in (content grows by that fraction per frame),
    < 0 zooms out. Returns (T, H, W, 3) uint8."""
    import cv2

    big = panning_texture(1, height * 2, width * 2, velocity=(0.0, 0.0), seed=seed)[0]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        scale = (1 + rate) ** (t if rate > 0 else t - num_frames + 1)  # never crops outside the texture
        h, w = round(height * 1.9 / scale), round(width * 1.9 / scale)
        top, left = (2 * height - h) // 2, (2 * width - w) // 2
        frames[t] = cv2.resize(
            big[top : top + h, left : left + w], (width, height), interpolation=cv2.INTER_AREA
        )
    return frames


def video_with_cuts(
    segments: list[np.ndarray], transitions: list[tuple[str, int]]
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Joins shots with transitions, each ("cut", 0), ("dissolve", n), ("fade", n) or ("fade_white", n) — a
    fade goes through black (or white) over n frames. Returns the frames and, per transition, the [first,
    last] frame it spans (a hard cut spans the first frame of the next shot): the ground truth for cut
    detection."""
    if len(transitions) != len(segments) - 1:
        raise ValueError(
            f"{len(segments)} shots need {len(segments) - 1} transitions, got {len(transitions)}"
        )
    out, truth = [segments[0]], []
    for (kind, n), shot in zip(transitions, segments[1:], strict=True):
        start = sum(len(s) for s in out)
        if kind == "cut":
            truth.append((start, start))
        elif kind in ("dissolve", "fade", "fade_white"):
            if n > min(len(out[-1]), len(shot)):
                raise ValueError(
                    f"a {n}-frame {kind} needs {n} frames on each side; the shots around transition "
                    f"{len(truth)} have {len(out[-1])} and {len(shot)} left"
                )
            previous, out[-1] = out[-1][-n:], out[-1][:-n]
            start -= n
            weights = np.linspace(0, 1, n + 2)[1:-1, None, None, None]
            if kind == "dissolve":
                mixed = (1 - weights) * previous + weights * shot[:n]
            elif kind == "fade":  # out to black over the first half, in from black over the second
                mixed = np.where(weights < 0.5, previous * (1 - 2 * weights), shot[:n] * (2 * weights - 1))
            else:  # the same through white
                out_, in_ = (
                    255 - (255 - previous) * (1 - 2 * weights),
                    255 - (255 - shot[:n]) * (2 * weights - 1),
                )
                mixed = np.where(weights < 0.5, out_, in_)
            out.append(mixed.astype(np.uint8))
            shot = shot[n:]
            truth.append((start, start + n - 1))
        else:
            raise ValueError(f"unknown transition {kind!r}")
        out.append(shot)
    return np.concatenate(out), truth


def _smooth_texture(rng: np.random.Generator, height: int, width: int, block: int) -> np.ndarray:
    """Random texture in [0, 1) of features about `block` pixels (bilinearly upsampled noise of two
    octaves), so a scene has both large shapes and detail, like natural footage. (H, W, 3) float32."""
    import cv2

    out = np.zeros((height, width, 3), np.float32)
    for scale, weight in ((block * 4, 0.6), (block, 0.4)):
        coarse = rng.random((height // scale + 2, width // scale + 2, 3), dtype=np.float32)
        big = cv2.resize(
            coarse, (coarse.shape[1] * scale, coarse.shape[0] * scale), interpolation=cv2.INTER_LINEAR
        )
        out += weight * big[:height, :width]
    grey = out.mean(axis=2, keepdims=True)
    return 0.7 * grey + 0.3 * out  # mostly luminance structure, some colour


def graded_scene(
    num_frames: int,
    height: int,
    width: int,
    *,
    contrast: float = 1.0,
    brightness: float = 128.0,
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0),
    pan: tuple[float, float] = (0.0, 1.0),
    zoom: float = 0.0,
    block: int = 8,
    moving_object: bool = True,
    noise: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """A camera over a textured scene with a moving object, colour-graded: `contrast` scales the spread
    around `brightness` (0..255), `tint` scales each channel; `pan` (rows, columns per frame, sub-pixel) and
    `zoom` (fraction per frame) move the camera; `noise` is the sensor noise's standard deviation. The
    material of cut-detection benchmarks: low contrast and dim scenes move pixel differences towards the
    noise. Returns (T, H, W, 3) uint8."""
    import cv2

    rng = np.random.default_rng(seed)
    margin = int(
        np.ceil(max(abs(pan[0]), abs(pan[1])) * num_frames + abs(zoom) * num_frames * max(height, width))
    )
    big_h, big_w = height + 2 * margin + 2, width + 2 * margin + 2
    texture = _smooth_texture(rng, big_h, big_w, block)
    centre = np.array([big_w / 2, big_h / 2], np.float32)
    side = int(rng.uniform(0.15, 0.3) * min(height, width))
    obj_colour = rng.random(3, dtype=np.float32)
    obj_pos = rng.uniform([0, 0], [height - side, width - side])
    obj_vel = rng.uniform(-2.5, 2.5, 2)
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    gain = np.asarray(tint, np.float32) * 255.0 * contrast
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        scale = (1.0 + zoom) ** t
        # output pixel (x, y) samples the texture at centre + offset(t) + (x - w/2, y - h/2) / scale
        offset = (
            centre
            + np.array([pan[1] * t, pan[0] * t], np.float32)
            - [margin * np.sign(pan[1]), margin * np.sign(pan[0])]
        )
        matrix = np.array(
            [[1 / scale, 0, offset[0] - width / 2 / scale], [0, 1 / scale, offset[1] - height / 2 / scale]],
            np.float32,
        )
        view = cv2.warpAffine(
            texture,
            matrix,
            (width, height),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT,
        )
        if moving_object:
            top, left = (obj_pos + obj_vel * t) % [height, width]
            inside = (((rows - round(top)) % height) < side) & (((cols - round(left)) % width) < side)
            view[inside] = obj_colour
        frame = brightness * np.asarray(tint, np.float32) + (view - 0.5) * gain
        if noise:
            frame += noise * rng.standard_normal(frame.shape, dtype=np.float32)
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


TRANSITION_KINDS = {"cut": 0.4, "dissolve": 0.3, "fade": 0.2, "fade_white": 0.1}


def graded_videos(
    videos: int,
    *,
    shots: int = 6,
    size: tuple[int, int] = (192, 320),
    shot_frames: tuple[int, int] = (90, 160),
    transition_frames: tuple[int, int] = (8, 30),
    contrast: tuple[float, float] = (0.12, 1.0),
    max_pan: float = 1.5,
    max_zoom: float = 0.004,
    max_noise: float = 3.0,
    seed: int = 0,
) -> Iterator[tuple[np.ndarray, list[tuple[int, int]], list[str]]]:
    """Videos of `graded_scene` shots for cut-detection benchmarks, one at a time: (frames, truth as in
    `video_with_cuts`, the kind of each transition). Per video a look (contrast log-uniform in `contrast`,
    brightness 50–200, a tint, sensor noise up to `max_noise`); half of the shots keep the previous shot's
    look exactly (a dissolve between similar-looking scenes), the others vary it. Shots pan in any
    direction at up to `max_pan` px per frame, a third also zoom, most have a moving object; transitions
    are drawn from `TRANSITION_KINDS`, gradual ones `transition_frames` long."""
    rng = np.random.default_rng(seed)
    height, width = size
    kinds, weights = list(TRANSITION_KINDS), list(TRANSITION_KINDS.values())
    for _ in range(videos):
        look = {
            "contrast": float(np.exp(rng.uniform(*np.log(contrast)))),
            "brightness": float(rng.uniform(50, 200)),
            "tint": tuple(float(x) for x in rng.uniform(0.55, 1.0, 3)),
            "noise": float(rng.uniform(0, max_noise)),
        }
        frames = []
        for s in range(shots):
            if s and rng.random() < 0.5:
                look = look | {
                    "contrast": float(np.clip(look["contrast"] * rng.uniform(0.7, 1.4), *contrast)),
                    "brightness": float(np.clip(look["brightness"] + rng.uniform(-40, 40), 40, 210)),
                    "tint": tuple(
                        float(np.clip(x * rng.uniform(0.85, 1.15), 0.4, 1.0)) for x in look["tint"]
                    ),
                }
            angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0, max_pan)
            frames.append(
                graded_scene(
                    int(rng.integers(*shot_frames)),
                    height,
                    width,
                    pan=(float(speed * np.sin(angle)), float(speed * np.cos(angle))),
                    zoom=float(rng.uniform(-max_zoom, max_zoom)) if rng.random() < 1 / 3 else 0.0,
                    block=int(rng.choice([4, 8, 16])),
                    moving_object=bool(rng.random() < 0.8),
                    seed=int(rng.integers(1 << 30)),
                    **look,
                )
            )
        chosen = [str(k) for k in rng.choice(kinds, size=shots - 1, p=weights)]
        lengths = [
            0 if k == "cut" else int(rng.integers(transition_frames[0], transition_frames[1] + 1))
            for k in chosen
        ]
        video, truth = video_with_cuts(frames, list(zip(chosen, lengths, strict=True)))
        yield video, truth, chosen


def clip_table_batches(rows: int, video_uri: str, *, seed: int = 0, chunk: int = 1_000_000):
    """`rows` clip-table rows as Arrow record batches of `chunk` rows, fast enough for tables of millions
    (a 10M-row table in seconds): every clip cuts the same `video_uri`, and the columns that decide buckets
    and filters vary like curated data (sizes of a few aspect ratios, random durations and scores, ~1%
    held out as `val`), so a scan of them reads what a real table's would. Captions stay empty: no scan of
    the index reads them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from svd.data.schema import CAMERA_MOTIONS, clip_schema

    rng = np.random.default_rng(seed)
    schema = clip_schema()
    sizes = np.array([(256, 384), (320, 576), (360, 640), (480, 640), (512, 512), (576, 1024)], np.int32)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        size = sizes[rng.integers(0, len(sizes), n)]
        fps = rng.choice(np.array([24.0, 25.0, 30.0], np.float32), n)
        start_s = rng.uniform(0.0, 300.0, n)
        end_s = start_s + rng.uniform(2.0, 10.0, n)
        ids = pa.array(np.arange(start, start + n)).cast(pa.string())
        columns = {
            "clip_id": pc.binary_join_element_wise("clip-", ids, ""),
            "video_uri": pa.repeat(video_uri, n),
            "start_s": start_s,
            "end_s": end_s,
            "fps": fps,
            "width": size[:, 1],
            "height": size[:, 0],
            "num_frames": np.floor((end_s - start_s) * fps).astype(np.int32),
            "captions": pa.nulls(n, pa.list_(pa.string())),
            "motion_score": rng.random(n, np.float32),
            "aesthetic_score": rng.uniform(3.0, 7.0, n).astype(np.float32),
            "clip_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
            "text_area": rng.exponential(0.03, n).astype(np.float32),
            "camera_motion": pa.array(np.array(CAMERA_MOTIONS)[rng.integers(0, len(CAMERA_MOTIONS), n)]),
            "source": pa.repeat("synthetic", n),
            "split": pa.array(np.where(rng.random(n) < 0.01, "val", "train")),
        }
        yield pa.RecordBatch.from_arrays([pa.array(columns[f.name], f.type) for f in schema], schema=schema)
