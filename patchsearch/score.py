"""PatchCore scoring: reweighted image score (paper Eq. 7) and anomaly maps.

All distances here are L2 (not squared).
"""

from __future__ import annotations

import numpy as np

SIGMA = 4.0


def reweighted_scores(test_patches: np.ndarray, s_star: np.ndarray, support: np.ndarray,
                      bank: np.ndarray) -> np.ndarray:
    """PatchCore image score, paper Eq. 7.

    For each image, m_test* is its patch with the largest nearest-neighbour distance
    s* and m* its nearest memory-bank vector. With N_b(m*) the b memory-bank vectors
    nearest to m* (m* itself first)::

        s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*

    Args:
        test_patches: float32 (N, d), m_test* of each image.
        s_star: float (N,), its nearest-neighbour L2 distance.
        support: int64 (N, b) memory-bank rows of N_b(m*), column 0 = m*.
        bank: float32 (M, d) memory bank.

    Returns:
        float32 (N,) image scores. With b == 1 the score is s* (no reweighting, as anomalib).
    """
    s_star = np.asarray(s_star, dtype=np.float64)
    if support.shape[1] == 1:
        return s_star.astype(np.float32)
    diff = bank[support].astype(np.float64) - np.asarray(test_patches, dtype=np.float64)[:, None, :]
    dist = np.sqrt((diff * diff).sum(-1))                       # (N, b) L2
    z = np.exp(dist - dist.max(axis=1, keepdims=True))          # stable softmax
    weight = 1.0 - z[:, 0] / z.sum(axis=1)
    return (weight * s_star).astype(np.float32)


def anomaly_maps(patch_scores: np.ndarray, size: tuple[int, int], sigma: float = SIGMA,
                 device: str | None = None) -> np.ndarray:
    """Anomaly maps from patch-score grids (PatchCore §3.3).

    The grid is upsampled bilinearly to ``size`` and smoothed with a Gaussian of
    standard deviation ``sigma`` pixels (kernel 2*int(4*sigma+0.5)+1, reflect padding;
    ``torchvision.transforms.functional.gaussian_blur``).

    Args:
        patch_scores: float (N, h, w) nearest-neighbour L2 distance per patch.
        size: (H, W) output size in pixels (the crop size).
        sigma: Gaussian standard deviation in pixels; 0 disables the blur.
        device: torch device the upsampling and blur run on (default: the CPU); only the
            maps come back.

    Returns:
        float32 (N, H, W) numpy.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.transforms.functional import gaussian_blur

    t = torch.as_tensor(np.asarray(patch_scores, dtype=np.float32))[:, None]
    if device is not None and device != "cpu":
        t = t.to(device)
    t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    if sigma > 0:
        k = 2 * int(4.0 * sigma + 0.5) + 1
        t = gaussian_blur(t, kernel_size=[k, k], sigma=[sigma, sigma])
    return t[:, 0].cpu().numpy()
