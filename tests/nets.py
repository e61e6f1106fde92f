"""Small stand-in models shared by the tests (not a test module)."""
import torch
from torch import nn

from aniso_fast.networks.gmm import GaussianMixture


def pca_mixture():
    """Two classes with their own principal subspaces: a per-class PCA basis (ids), K = 2, two components per
    class (one Gaussian has an affine flow: zero Hessian, nothing for the estimator's trace to test)."""
    f64 = torch.float64
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(120, 1, 8, 8, generator=gen, dtype=f64) * torch.linspace(1, 0.1, 64, dtype=f64).reshape(8, 8)
    labels = torch.arange(120) % 2
    imgs[labels == 1] = imgs[labels == 1].transpose(-1, -2)
    one = GaussianMixture.fit_pca(imgs, labels, rank=6, split=3)
    means = torch.cat([one.means, one.means + 0.1 * torch.randn(one.means.shape, generator=gen, dtype=f64)])
    variances = torch.cat([one.variances, one.variances * 0.5])
    return GaussianMixture(one.fine, one.parent.tolist(), means, variances, classes=torch.tensor([0, 1, 0, 1]))


class TinyNet(nn.Module):
    """EDM signature (x, c_noise, class_labels); nonlinear in x so the Hessian is not zero."""

    def __init__(self, channels=1, label_dim=0):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.label_dim = label_dim
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(1, channels)
        self.lab = nn.Linear(label_dim, channels) if label_dim else None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))

    def forward(self, x, c_noise, class_labels=None):
        h = self.conv(x) + self.emb(c_noise[:, None])[:, :, None, None]
        if self.lab is not None:
            h = h + self.lab(class_labels)[:, :, None, None]
        return torch.tanh(h) * x + h
