"""Map upsampling and blur as matrix products: the same numbers as torch's resize and our blur."""
import pytest
import torch
import torch.nn.functional as F

from anomalens.components.blur import gaussian_blur, upsample_and_blur


@pytest.mark.parametrize("grid, size, sigma", [
    ((64, 64), (256, 256), 4.0),  # PaDiM's grid at 256 px
    ((7, 9), (30, 41), 2.0),  # odd sizes, non-integer scales
    ((3, 3), (3, 3), 4.0),  # kernel wider than the map: reflect padding clamped, kernel renormalised
    ((1, 5), (4, 20), 1.0),  # a single row
    ((32, 32), (256, 256), 0.0),  # no blur
    ((5, 5), (2, 2), 1.0),  # downsampling
])
def test_matches_interpolate_then_blur(grid, size, sigma):
    maps = torch.rand(3, 1, *grid, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    resized = maps if grid == size else F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    expected = gaussian_blur(resized, sigma)
    got = upsample_and_blur(maps, size, sigma)
    assert got.shape == expected.shape == (3, 1, *size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_float32_maps_stay_float32():
    maps = torch.rand(2, 1, 16, 16)
    assert upsample_and_blur(maps, (64, 64), 4.0).dtype == torch.float32
