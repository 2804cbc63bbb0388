import torch

from pipeline.evaluation.metrics import active_units


def test_active_units_counts_dimensions_whose_means_vary_across_images():
    torch.manual_seed(0)
    means = torch.cat(
        [torch.randn(1000, 2), 0.05 * torch.randn(1000, 1), torch.full((1000, 3), 0.7)], dim=1
    )  # variances about 1, 1, 0.0025, 0, 0, 0
    assert active_units(means) == 2
    assert active_units(means, threshold=0.001) == 3
