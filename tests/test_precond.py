"""Preconditioner: isotropic case equals EDM's EDMPrecond; flow and denoiser agree; class-conditional bases."""

import pytest
import torch
from torch import nn

from aniso_fast.geometry.bases import DCTBasis, IsotropicBasis, PCABasis
from aniso_fast.networks.precond import AnisoPrecond

f64 = torch.float64


class TinyNet(nn.Module):
    """A deterministic nonlinear stand-in with EDM's (x, c_noise, class_labels) signature."""

    def __init__(self, label_dim=0):
        super().__init__()
        self.label_dim = label_dim
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.lab = nn.Linear(max(label_dim, 1), 2)

    def forward(self, x, c_noise, class_labels=None):
        h = torch.tanh(self.conv(x)) * (1 + c_noise[:, None, None, None])
        if class_labels is not None:
            h = h + self.lab(class_labels)[:, :, None, None]
        return h


def edm_precond(net, x, sigma, labels=None, sigma_data=0.5):
    """EDM's EDMPrecond.forward (training/networks.py), written out from its formulas."""
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = s * sigma_data / (s ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + s ** 2).sqrt()
    c_noise = sigma.log() / 4
    F = net((c_in * x).float(), c_noise.float(), labels).to(x.dtype)
    return c_skip * x + c_out * F


@pytest.mark.parametrize("basis", [IsotropicBasis((6, 6)), DCTBasis(6, 6, (2,)), DCTBasis(6, 6, (2, 4))])
def test_isotropic_case_equals_edm(basis):
    torch.manual_seed(0)
    net = TinyNet()
    pre = AnisoPrecond(net, basis)
    x = torch.randn(4, 2, 6, 6, dtype=f64) * 3
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=f64)
    g = (sigma ** 2)[:, None].expand(-1, basis.num_subspaces)
    assert torch.allclose(pre.denoise(x, g), edm_precond(net, x, sigma), atol=1e-5)
    # F = M^{-1/2}(D - x) = (D - x)/sigma in the isotropic case (METHOD §3.3)
    F = pre.flow(x, g)
    assert torch.allclose(F, (edm_precond(net, x, sigma) - x) / sigma.reshape(-1, 1, 1, 1), atol=1e-4)


def test_anisotropic_flow_and_denoiser_consistent():
    torch.manual_seed(1)
    basis = DCTBasis(6, 6, (3,))
    pre = AnisoPrecond(TinyNet(), basis)
    x = torch.randn(3, 2, 6, 6, dtype=f64)
    g = torch.tensor([[0.1, 4.0], [2.0, 0.3], [50.0, 6400.0]], dtype=f64)
    D, F = pre.denoise(x, g), pre.flow(x, g)
    assert torch.allclose(F, basis.scale(D - x, g.rsqrt()), atol=1e-6)
    # c_noise = (ln g + ln h)/16: the geometric-mean sigma (METHOD §3.2)
    seen = {}
    pre.net.forward = lambda xi, c_noise, labels=None: (seen.setdefault("c", c_noise), xi * 0)[1]
    pre.denoise(x, g)
    assert torch.allclose(seen["c"].double(), (g[:, 0].log() + g[:, 1].log()) / 16, atol=1e-6)


def test_anisotropic_input_whitened_per_subspace():
    """C_in = (M + sd^2)^{-1/2} acts per subspace: the network input of x = M^{1/2} eps has ~unit scale."""
    basis = DCTBasis(8, 8, (3,))
    seen = {}

    class Spy(nn.Module):
        label_dim = 0

        def forward(self, x, c_noise, labels=None):
            seen["x"] = x
            return torch.zeros_like(x)

    pre = AnisoPrecond(Spy(), basis)
    g = torch.tensor([[1e4, 1.0]], dtype=f64).expand(512, -1)
    eps = torch.randn(512, 1, 8, 8, dtype=f64)
    pre.denoise(basis.scale(eps, g.sqrt()), g)
    norms = basis.sqnorms(seen["x"].double()).mean(0) / torch.tensor(basis.subspace_dims(1), dtype=f64)
    assert torch.allclose(norms, torch.tensor([1e4 / (1e4 + 0.25), 1 / 1.25], dtype=f64), rtol=0.05)


def test_class_labels_and_class_bases():
    torch.manual_seed(2)
    imgs = torch.randn(200, 2, 4, 4)
    labels = torch.arange(200) % 3
    basis = PCABasis.fit(imgs, labels, rank=4, per="class")
    pre = AnisoPrecond(TinyNet(label_dim=3), basis)
    x = torch.randn(3, 2, 4, 4)
    g = torch.rand(3, 2, dtype=f64) + 0.5
    lab = torch.tensor([0, 1, 2])
    D = pre.denoise(x, g, lab)
    for i in range(3):
        assert torch.allclose(D[i], pre.denoise(x[i:i + 1], g[i:i + 1], lab[i:i + 1])[0], atol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        pre.denoise(x, g)
    with pytest.raises(ValueError, match="g: expected"):
        pre.denoise(x, g[:, :1], lab)
