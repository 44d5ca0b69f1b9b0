"""The CPU convolutions through oneDNN (avatarcli.models.cpu_convs): the same convolution up to float rounding,
installed on every VAE loaded for the CPU, and left alone on other dtypes."""

import pytest
import torch

from avatarcli.models.cpu_convs import OneDNNConvolution, use_onednn_convolutions

@pytest.mark.parametrize("conv", [
    torch.nn.Conv3d(6, 5, 3, padding=1), torch.nn.Conv3d(6, 4, (3, 1, 1), stride=(2, 1, 1)),
    torch.nn.Conv2d(6, 8, 3, padding=1, bias=False), torch.nn.Conv3d(6, 6, 1),
])
def test_onednn_convolution_matches_pytorch_up_to_rounding(conv):
    torch.manual_seed(0)
    x = torch.randn(1, 6, *([5, 12, 9] if isinstance(conv, torch.nn.Conv3d) else [12, 9]))
    expected = conv(x)
    assert use_onednn_convolutions(conv) == 1 and isinstance(conv._conv_forward, OneDNNConvolution)
    got = conv(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got.sum().backward()  # still differentiable
    assert conv.weight.grad is not None


def test_other_dtypes_keep_pytorchs_own_path():
    conv = torch.nn.Conv3d(4, 4, 3, padding=1).to(torch.float64)
    x = torch.randn(1, 4, 3, 6, 6, dtype=torch.float64)
    expected = conv(x)
    use_onednn_convolutions(conv)
    assert torch.equal(conv(x), expected)


def test_a_vae_loaded_for_the_cpu_runs_its_convolutions_through_onednn(tmp_path):
    from safetensors.torch import save_file

    from avatarcli.loading.components import load_vae
    from avatarcli.testing.components import wan_vae_original_shapes

    torch.manual_seed(0)
    state = {key: torch.randn(shape) * 0.05 for key, shape in wan_vae_original_shapes(dim=4, z_dim=16).items()}
    save_file(state, str(tmp_path / "vae.safetensors"))
    vae = load_vae(tmp_path / "vae.safetensors", device="cpu")
    convs = [m for m in vae.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert convs and all(isinstance(m._conv_forward, OneDNNConvolution) for m in convs)
