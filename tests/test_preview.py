"""Per-step previews: latents of any width become small RGB images without a VAE."""

import numpy as np
import torch

from personalize.runs.preview import SD_LATENT_RGB, latents_to_rgb, map_to_image


def test_four_channels_use_the_sd_map():
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = latents_to_rgb(z)
    assert [im.size for im in images] == [(8, 8), (8, 8)]
    rgb = torch.einsum("chw,cr->hwr", z[1], SD_LATENT_RGB)
    expect = ((rgb - rgb.amin()) / (rgb.amax() - rgb.amin()) * 255).round().numpy()
    assert np.abs(np.asarray(images[1]).astype(float) - expect).max() <= 1


def test_other_widths_show_their_first_three_channels():
    z = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    image = np.asarray(latents_to_rgb(z)[0]).astype(float)
    first = z[0, :3].permute(1, 2, 0)
    expect = ((first - first.amin()) / (first.amax() - first.amin()) * 255).round().numpy()
    assert image.shape == (16, 16, 3) and np.abs(image - expect).max() <= 1
    # the other five channels do not reach the picture
    z2 = z.clone()
    z2[:, 3:] = 0
    assert np.array_equal(np.asarray(latents_to_rgb(z2)[0]), np.asarray(latents_to_rgb(z)[0]))


def test_map_to_image_stretches():
    img = np.asarray(map_to_image(torch.tensor([[0.0, 1.0], [2.0, 4.0]])))
    assert img.tolist() == [[0, 64], [128, 255]]
