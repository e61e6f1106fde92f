"""Small stand-in networks shared by the tests (not a test module)."""
import torch
from torch import nn


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
