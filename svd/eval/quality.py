"""Weight-free quality measures of videos as float arrays (frames, channels, height, width) in [0, 1]:
PSNR and SSIM of generated frames against the true ones (interpolation), and temporal flicker."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Wang et al. (2004): an 11-tap Gaussian window of σ 1.5, K1 = 0.01, K2 = 0.03, over the valid region.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def psnr(generated: np.ndarray, truth: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over every pixel; infinite for identical videos."""
    a, b = _pair(generated, truth)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


def ssim(generated: np.ndarray, truth: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity over every frame, channel and valid window position."""
    a, b = _pair(generated, truth)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        size = f"{SSIM_WINDOW}×{SSIM_WINDOW}"
        raise ValueError(f"SSIM needs frames of at least {size} pixels, got {a.shape[-2:]}")
    x = torch.from_numpy(a).reshape(-1, 1, *a.shape[-2:])
    y = torch.from_numpy(b).reshape(-1, 1, *b.shape[-2:])
    window = _gaussian_window()

    def local_mean(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def flicker(video: np.ndarray) -> float:
    """Temporal flicker: the mean squared difference between consecutive frames. Reported against the
    references' (a ratio), since real motion also changes frames."""
    v = np.asarray(video, dtype=np.float64)
    if v.ndim != 4 or v.shape[0] < 2:
        raise ValueError(f"flicker needs a video (frames ≥ 2, channels, height, width), got shape {v.shape}")
    return float((np.diff(v, axis=0) ** 2).mean())


def _pair(generated: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(generated, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"generated {a.shape} and true {b.shape} videos must have one shape "
            "(frames, channels, height, width)"
        )
    return a, b


def _gaussian_window() -> torch.Tensor:
    taps = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    g = torch.exp(-(taps**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g)[None, None]
