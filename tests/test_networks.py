"""SongUNet: EDM parameter layout, forward behaviour at 28x28 and 32x32, double backward, config round trip."""
import hashlib
import json
import math

import pytest
import torch

from aniso_fast.networks.unet import SongUNet, fashion_mnist_unet

# DDPM++ CIFAR-10 (EDM train.py --arch=ddpmpp): the SongUNet that EDMPrecond builds for edm-cifar10-32x32-*-vp.
CIFAR_DDPMPP = dict(
    img_resolution=32, in_channels=3, out_channels=3, label_dim=10, model_channels=128, channel_mult=[2, 2, 2],
    num_blocks=4, attn_resolutions=[16], dropout=0.13, encoder_type="standard", decoder_type="standard",
    embedding_type="positional", channel_mult_noise=1, resample_filter=[1, 1],
)

# Expected state dict of EDM's SongUNet for CIFAR_DDPMPP, derived from NVlabs/edm training/networks.py
# (SongUNet.__init__, UNetBlock, Conv2d, Linear, GroupNorm) and checked against an instance of EDM's classes:
# - 426 entries: 418 parameters + 8 `resample_filter` buffers [1, 1, 2, 2] (conv0 and skip of the two `_down` and
#   the two `_up` blocks; EDM registers the filter as None, i.e. no entry, when a conv does not resample).
# - 55,734,147 parameters: mapping 329,984 (map_label 10*128+128, map_layer0 128*512+512, map_layer1 512*512+512),
#   encoder 4,991,488 (32x32) + 7,683,072 (16x16) + 6,628,352 (8x8), decoder 13,059,584 (8x8) + 11,812,864 (16x16)
#   + 11,228,675 (32x32). The official edm-cifar10-32x32-cond-vp net also has augment_dim=9 (map_augment.weight
#   [128, 9], no bias): 55,735,299, the "55.7M" of DDPM++ at CIFAR-10 in EDM.
# - the sha256 covers every "key:[shape]" line in order.
CIFAR_NUM_ENTRIES = 426
CIFAR_NUM_BUFFERS = 8
CIFAR_NUM_PARAMS = 55_734_147
CIFAR_NUM_PARAMS_AUGMENT9 = 55_735_299
CIFAR_SHA256 = "1dbd80f1f41ada552f04d6a2a3d0bb1721a5d1665ee635e29bb805d043e2180d"
CIFAR_SAMPLE = {
    "map_label.weight": [128, 10],
    "map_label.bias": [128],
    "map_layer0.weight": [512, 128],
    "map_layer1.weight": [512, 512],
    "enc.32x32_conv.weight": [128, 3, 3, 3],
    "enc.32x32_block0.norm0.weight": [128],
    "enc.32x32_block0.conv0.weight": [256, 128, 3, 3],
    "enc.32x32_block0.affine.weight": [256, 512],
    "enc.32x32_block0.skip.weight": [256, 128, 1, 1],
    "enc.32x32_block1.conv1.weight": [256, 256, 3, 3],
    "enc.16x16_down.conv0.resample_filter": [1, 1, 2, 2],
    "enc.16x16_down.skip.weight": [256, 256, 1, 1],
    "enc.16x16_block0.norm2.weight": [256],
    "enc.16x16_block3.qkv.weight": [768, 256, 1, 1],
    "enc.16x16_block3.proj.bias": [256],
    "enc.8x8_block3.conv1.bias": [256],
    "dec.8x8_in0.qkv.weight": [768, 256, 1, 1],
    "dec.8x8_in1.conv0.weight": [256, 256, 3, 3],
    "dec.8x8_block0.conv0.weight": [256, 512, 3, 3],
    "dec.16x16_up.skip.resample_filter": [1, 1, 2, 2],
    "dec.16x16_block4.qkv.bias": [768],
    "dec.32x32_block0.skip.weight": [256, 512, 1, 1],
    "dec.32x32_block4.conv0.weight": [256, 384, 3, 3],
    "dec.32x32_aux_norm.weight": [256],
    "dec.32x32_aux_conv.weight": [3, 256, 3, 3],
    "dec.32x32_aux_conv.bias": [3],
}
CIFAR_ABSENT = ["map_augment.weight", "map_noise.freqs", "enc.16x16_block0.skip.weight", "dec.8x8_in0.skip.weight",
                "enc.16x16_down.conv1.resample_filter", "dec.16x16_block3.qkv.weight", "enc.32x32_block0.qkv.weight"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar_net():
    return SongUNet(**CIFAR_DDPMPP)


def _shapes(net):
    return {k: list(v.shape) for k, v in net.state_dict().items()}


def test_cifar_ddpmpp_state_dict_matches_edm(cifar_net):
    net = cifar_net
    shapes = _shapes(net)
    assert len(shapes) == CIFAR_NUM_ENTRIES
    assert sum(1 for _ in net.buffers()) == CIFAR_NUM_BUFFERS
    for key, shape in CIFAR_SAMPLE.items():
        assert shapes.get(key) == shape, key
    for key in CIFAR_ABSENT:
        assert key not in shapes
    assert sum(p.numel() for p in net.parameters()) == CIFAR_NUM_PARAMS
    lines = "\n".join(f"{k}:{v}" for k, v in shapes.items())
    assert hashlib.sha256(lines.encode()).hexdigest() == CIFAR_SHA256


def test_cifar_ddpmpp_with_augment_labels():
    net = SongUNet(**dict(CIFAR_DDPMPP, augment_dim=9))
    assert _shapes(net)["map_augment.weight"] == [128, 9]
    assert sum(p.numel() for p in net.parameters()) == CIFAR_NUM_PARAMS_AUGMENT9


def _randomize(net: SongUNet, seed: int = 0) -> SongUNet:
    """Trained-like weights: EDM zero-initialises the last conv of every block, which would hide most of the net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + scale)
    return net


def _inputs(batch=4, res=28, ch=1, label_dim=10, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, ch, res, res, generator=g).to(dtype)
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 1.2)
    noise = (sigma.log() / 4).to(dtype)  # EDM's c_noise
    labels = torch.nn.functional.one_hot(torch.arange(batch) % max(label_dim, 1), max(label_dim, 1)).to(dtype)
    return x, noise, labels if label_dim else None


@pytest.fixture(scope="module")
def fmnist_net():
    torch.manual_seed(0)
    return _randomize(fashion_mnist_unet()).eval()


def test_fashion_mnist_preset(fmnist_net):
    cfg = fmnist_net.config()
    assert (cfg["img_resolution"], cfg["in_channels"], cfg["out_channels"], cfg["label_dim"]) == (28, 1, 1, 10)
    assert list(fmnist_net.enc.keys())[::2] == ["28x28_conv", "14x14_down", "7x7_down"]
    assert sum(p.numel() for p in fmnist_net.parameters()) == 887_681  # the preset's size, pinned on purpose


def test_output_shape_and_class_conditioning(fmnist_net):
    x, noise, labels = _inputs()
    with torch.no_grad():
        out = fmnist_net(x, noise, labels)
        other = fmnist_net(x, noise, labels.roll(1, dims=0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    diff = (out - other).flatten(1).norm(dim=1) / out.flatten(1).norm(dim=1)
    assert (diff > 1e-3).all()  # every sample's output depends on its class


def test_class_labels_required(fmnist_net):
    x, noise, _ = _inputs()
    with pytest.raises(ValueError, match="class_labels"):
        fmnist_net(x, noise, None)


def test_deterministic():
    torch.manual_seed(3)
    a = fashion_mnist_unet()
    torch.manual_seed(3)
    b = fashion_mnist_unet()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    _randomize(a.eval())
    x, noise, labels = _inputs()
    with torch.no_grad():
        assert torch.equal(a(x, noise, labels), a(x, noise, labels))


@pytest.mark.parametrize("res, ch", [(28, 1), (32, 3)])
@pytest.mark.parametrize("encoder_type, decoder_type, embedding_type, resample_filter, channel_mult_noise", [
    ("standard", "standard", "positional", [1, 1], 1),  # DDPM++
    ("residual", "standard", "fourier", [1, 3, 3, 1], 2),  # NCSN++
    ("skip", "skip", "positional", [1, 3, 3, 1], 1),
])
def test_architecture_variants(res, ch, encoder_type, decoder_type, embedding_type, resample_filter,
                               channel_mult_noise):
    torch.manual_seed(0)
    net = SongUNet(img_resolution=res, in_channels=ch, out_channels=ch, label_dim=3, augment_dim=2, model_channels=8,
                   channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[res // 2], encoder_type=encoder_type,
                   decoder_type=decoder_type, embedding_type=embedding_type, resample_filter=resample_filter,
                   channel_mult_noise=channel_mult_noise).eval()
    _randomize(net)
    x, noise, labels = _inputs(batch=2, res=res, ch=ch, label_dim=3)
    with torch.no_grad():
        out = net(x, noise, labels, augment_labels=torch.randn(2, 2))
        assert not torch.equal(out, net(x, noise, labels))  # augmentation labels enter the embedding
    assert out.shape == x.shape and torch.isfinite(out).all()
    if embedding_type == "fourier":
        assert "map_noise.freqs" in net.state_dict()


def test_double_backward(fmnist_net):
    """The schedule-gradient estimator differentiates a gradient through the net (create_graph=True) once more."""
    net = fmnist_net.train()  # dropout on, as in training
    try:
        x, noise, labels = _inputs(batch=2)
        x = x.requires_grad_(True)
        torch.manual_seed(0)
        out = net(x, noise, labels)
        (gx,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), x, create_graph=True)
        params = [p for p in net.parameters()]
        grads = torch.autograd.grad(gx.square().sum(), [x] + params, allow_unused=True)
        assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
        used = [g for g in grads[1:] if g is not None]
        assert len(used) > len(params) // 2 and all(torch.isfinite(g).all() for g in used)
    finally:
        net.eval()


def test_second_derivative_fp64():
    """Second derivatives are correct, not just defined (attention included): the Hessian-vector product from double
    backward matches a central difference of the first derivative, in fp64 on a tiny net."""
    torch.manual_seed(0)
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, label_dim=2, model_channels=8, channel_mult=[1, 1],
                   num_blocks=1, attn_resolutions=[8], dropout=0.0)
    net = _randomize(net).double().eval()
    x, noise, labels = _inputs(batch=2, res=8, ch=1, label_dim=2, dtype=torch.float64)
    w, v = torch.randn_like(x), torch.randn_like(x)

    def grad_x(x, create_graph=False):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad((net(x, noise, labels) * w).sum().square(), x, create_graph=create_graph)[0], x

    g, xg = grad_x(x, create_graph=True)
    (hvp,) = torch.autograd.grad((g * v).sum(), xg)
    eps = 1e-5
    fd = (grad_x(x + eps * v)[0] - grad_x(x - eps * v)[0]) / (2 * eps)
    assert hvp.abs().max() > 1e-3
    torch.testing.assert_close(hvp, fd, rtol=1e-6, atol=1e-8)


def test_torch_func_grad_matches_autograd(fmnist_net):
    x, noise, labels = _inputs(batch=2)
    params = {k: v.detach() for k, v in fmnist_net.named_parameters()}
    buffers = dict(fmnist_net.named_buffers())

    def loss(x):
        return torch.func.functional_call(fmnist_net, (params, buffers), (x, noise, labels)).square().sum()

    gx = torch.func.grad(loss)(x)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(fmnist_net(xr, noise, labels).square().sum(), xr)
    torch.testing.assert_close(gx, ref)


def test_fp64_input(fmnist_net):
    x, noise, labels = _inputs(batch=2)
    net64 = fashion_mnist_unet()
    net64.load_state_dict(fmnist_net.state_dict())
    net64 = net64.double().eval()
    with torch.no_grad():
        out32 = fmnist_net(x, noise, labels)
        out64 = net64(x.double(), noise.double(), labels.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, atol=1e-4, rtol=1e-4)


def test_config_round_trip(fmnist_net):
    cfg = fmnist_net.config()
    assert json.loads(json.dumps(cfg)) == cfg
    rebuilt = SongUNet.from_config(cfg)
    assert rebuilt.config() == cfg
    rebuilt.load_state_dict(fmnist_net.state_dict(), strict=True)
    x, noise, labels = _inputs(batch=2)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x, noise, labels), fmnist_net(x, noise, labels))



@pytest.mark.parametrize("kwargs, match", [
    (dict(img_resolution=30, channel_mult=[1, 2, 2]), "img_resolution"),
    (dict(embedding_type="sinusoidal"), "embedding_type"),
    (dict(encoder_type="unet"), "encoder_type"),
    (dict(decoder_type="residual"), "decoder_type"),
])
def test_bad_arguments(kwargs, match):
    base = dict(img_resolution=28, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1, 2, 2],
                num_blocks=1)
    with pytest.raises(ValueError, match=match):
        SongUNet(**dict(base, **kwargs))


def test_from_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="use_fp17"):
        SongUNet.from_config(dict(img_resolution=28, in_channels=1, out_channels=1, use_fp17=True))
