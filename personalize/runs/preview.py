"""Cheap per-step previews: latents to RGB by a fixed linear map, no VAE decode."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Least-squares map from Stable Diffusion 1.x/2.x latent channels to RGB in [-1, 1], the
# approximation that live previews in the SD community use.
SD_LATENT_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


def latents_to_rgb(latents: torch.Tensor) -> list[Image.Image]:
    """(n, c, h, w) latents -> n small RGB images (h x w), each stretched to its own range
    so that random-weight models show something too. Four channels go through SD's map;
    other latent widths (the world's codec) show their first three channels."""
    z = latents.float().cpu()
    if z.shape[1] == SD_LATENT_RGB.shape[0]:
        rgb = torch.einsum("nchw,cr->nhwr", z, SD_LATENT_RGB)
    else:
        rgb = z[:, :3].permute(0, 2, 3, 1)
    images = []
    for img in rgb:
        lo, hi = img.amin(), img.amax()
        arr = ((img - lo) / (hi - lo).clamp_min(1e-8) * 255).round().to(torch.uint8).numpy()
        images.append(Image.fromarray(arr))
    return images


def map_to_image(grid) -> Image.Image:
    """A (h, w) map (attention or mask; tensor or array) as a grey image, stretched to [0, 255]."""
    g = grid.float().cpu().numpy() if torch.is_tensor(grid) else np.asarray(grid, dtype=np.float32)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-8)
    return Image.fromarray((g * 255).round().astype(np.uint8), mode="L")
