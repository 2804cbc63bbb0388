import pytest
import torch

from pipeline.evaluation.metrics import active_units


def test_active_units_counts_dimensions_whose_means_vary_across_images():
    torch.manual_seed(0)
    means = torch.cat(
        [torch.randn(1000, 2), 0.05 * torch.randn(1000, 1), torch.full((1000, 3), 0.7)], dim=1
    )  # variances about 1, 1, 0.0025, 0, 0, 0
    assert active_units(means) == 2
    assert active_units(means, threshold=0.001) == 3


@pytest.mark.parametrize("count, columns", [(1, 16), (5, 16), (17, 4), (32, 16), (64, 16)])
def test_the_evaluate_image_grid_is_byte_for_byte_torchvisions_save_image(count, columns, tmp_path):
    from torchvision.utils import save_image

    from pipeline.evaluate import save_image_grid

    images = torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(count))
    save_image(images, tmp_path / "torchvision.png", nrow=columns, pad_value=1.0)
    save_image_grid(images, tmp_path / "ours.png", columns)
    assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "torchvision.png").read_bytes()
