"""Image edits for the INR-editing experiment, written without OpenCV.

:func:`dilate` is a grey-level dilation with a square window, what ``cv2.dilate(img, ones((k, k)))``
computes with its defaults (anchor at the centre, one iteration, a border that never wins the max):
each pixel becomes the maximum of its ``k x k`` neighbourhood, clipped at the image edge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dilate"]


def dilate(images: torch.Tensor, size: int = 3, iterations: int = 1) -> torch.Tensor:
    """``[..., h, w]`` -> the same shape and dtype: the max over each ``size x size`` window (``size`` odd)."""
    if size % 2 != 1 or size < 1:
        raise ValueError(f"the window size must be a positive odd number, got {size}")
    shape, dtype = images.shape, images.dtype
    x = images.reshape(-1, 1, *shape[-2:]).to(torch.float64)
    for _ in range(iterations):
        x = F.max_pool2d(x, size, stride=1, padding=size // 2)     # max_pool2d pads with -inf: edge pixels clip
    return x.reshape(shape).to(dtype)
