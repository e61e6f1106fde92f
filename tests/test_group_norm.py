"""The networks' GroupNorm (+ SiLU) op (`aniso_fast.ops.norm`): the C++ channels_last kernel and the plain path
against a float64 reference computed from the definition, on fresh random inputs of many shapes, every dtype and
every instruction set; which path runs when; and the U-Net's exact identities (nearest upsampling, the fused
norm) in the network."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aniso_fast.ops import dispatch
from aniso_fast.ops.norm import group_norm, group_norm_path

needs_cpp = pytest.mark.skipif(not hasattr(dispatch._C, "group_norm_nhwc_cpu"),
                               reason="aniso_fast._C with the GroupNorm kernel is not built")
CPU_ISAS = ("base", "avx", "avx512")
# max |y - y_ref| / (1 + |y_ref|): the output's rounding (bf16 8 bits, fp16 11) plus the fp32 statistics' error
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}


def reference(x: torch.Tensor, groups: int, weight, bias, eps: float, silu: bool) -> torch.Tensor:
    """The definition in float64: per sample and group, (x - mean) / sqrt(var + eps) (biased variance), then the
    per-channel affine, then SiLU."""
    N, C = x.shape[:2]
    xg = x.double().reshape(N, groups, -1)
    mean = xg.mean(dim=2, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    y = y * weight.double().reshape(shape) + bias.double().reshape(shape)
    return y * torch.sigmoid(y) if silu else y


def make(N, C, H, W, dtype, seed, offset=3.0):
    gen = torch.Generator().manual_seed(seed)
    # an offset mean and a spread scale: the centred variance must not cancel
    x = (offset + 2.5 * torch.randn((N, C, H, W), generator=gen, dtype=torch.float64)).to(dtype)
    weight = 1 + 0.5 * torch.randn(C, generator=gen)
    bias = 0.5 * torch.randn(C, generator=gen)
    return x.contiguous(memory_format=torch.channels_last), weight, bias


def assert_close(y, x, groups, weight, bias, eps, silu):
    expected = reference(x, groups, weight, bias, eps, silu)
    err = ((y.double() - expected).abs() / (1 + expected.abs())).max().item()
    assert err <= TOL[x.dtype], f"{tuple(x.shape)} {x.dtype} groups={groups} silu={silu}: error {err:.3g}"
    assert y.dtype == x.dtype and y.shape == x.shape


@needs_cpp
@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 5), groups=st.sampled_from([1, 2, 4, 8, 32]), per_group=st.integers(1, 6),
       H=st.integers(1, 9), W=st.integers(2, 9), dtype=st.sampled_from([torch.float64, torch.float32,
                                                                       torch.bfloat16, torch.float16]),
       silu=st.booleans(), eps=st.sampled_from([1e-5, 1e-6]), seed=st.integers(0, 2 ** 31 - 1))
def test_kernel_matches_float64_reference(N, groups, per_group, H, W, dtype, silu, eps, seed):
    x, weight, bias = make(N, groups * per_group, H, W, dtype, seed)
    # one channel or one pixel: the tensor is contiguous too, and PyTorch's kernel runs it
    assert group_norm_path(x, weight, bias) == ("cpp" if groups * per_group > 1 and H * W > 1 else "reference")
    assert_close(group_norm(x, groups, weight, bias, eps, silu=silu), x, groups, weight, bias, eps, silu)


@needs_cpp
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_isa_on_the_networks_shapes(isa, dtype, monkeypatch):
    """Each compiled variant this CPU has, on the U-Net's shapes (whole vectors of channels) and an odd one."""
    monkeypatch.setenv("ANISO_FAST_CPU_ISA", isa)
    if dispatch._C.cpu_isa() != isa:
        pytest.skip(f"this CPU has no {isa}")
    for i, (N, C, H, W, groups) in enumerate(((3, 32, 28, 28, 8), (2, 64, 14, 14, 16), (2, 96, 7, 7, 24),
                                              (2, 12, 5, 3, 3))):
        x, weight, bias = make(N, C, H, W, dtype, seed=i)
        for silu in (False, True):
            assert_close(group_norm(x, groups, weight, bias, 1e-6, silu=silu), x, groups, weight, bias, 1e-6, silu)


@needs_cpp
def test_output_keeps_channels_last_and_extreme_values():
    """The output is channels_last like the input; SiLU's clamped exp gives the right limits far out."""
    x, weight, bias = make(2, 8, 4, 4, torch.float32, seed=1)
    y = group_norm(x, 2, weight, bias, 1e-5, silu=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    big_bias = torch.tensor([200.0, -200.0] * 4)
    y = group_norm(x, 2, torch.ones(8), big_bias, 1e-5, silu=True)
    expected = reference(x, 2, torch.ones(8), big_bias, 1e-5, True)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-30)


def test_paths():
    """The kernel runs channels_last CPU inference only; contiguous tensors, autograd and the reference backend
    take PyTorch's group_norm (+ silu), which is then exactly the old computation."""
    x, weight, bias = make(2, 8, 4, 4, torch.float32, seed=2)
    xc = x.contiguous()
    assert group_norm_path(xc, weight, bias) == "reference"
    assert group_norm_path(x, weight, bias, backend="reference") == "reference"
    assert group_norm_path(x.requires_grad_(), weight, bias) == "reference"
    with torch.no_grad():
        if hasattr(dispatch._C, "group_norm_nhwc_cpu"):
            assert group_norm_path(x, weight, bias) == "cpp"
    plain = torch.nn.functional.silu(torch.nn.functional.group_norm(xc, 2, weight, bias, 1e-5))
    assert torch.equal(group_norm(xc, 2, weight, bias, 1e-5, silu=True), plain)
    with pytest.raises(ValueError, match="divisible by groups=3"):
        group_norm(xc, 3, weight, bias, 1e-5)


def test_gradients_through_the_plain_path():
    """With autograd the op is PyTorch's composition, so gradients (and double backward) are PyTorch's: gradcheck
    on a channels_last input that requires grad."""
    x, weight, bias = make(2, 4, 3, 3, torch.float64, seed=3)
    x, weight, bias = x.requires_grad_(), weight.double().requires_grad_(), bias.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: group_norm(t[0], 2, t[1], t[2], 1e-5, silu=True), (x, weight, bias))
    assert torch.autograd.gradgradcheck(lambda *t: group_norm(t[0], 2, t[1], t[2], 1e-5, silu=True),
                                        (x, weight, bias))


@needs_cpp
def test_compile_traces_through_the_custom_op():
    """The fake implementation lets torch.compile trace the kernel call without a graph break."""
    x, weight, bias = make(2, 8, 4, 4, torch.float32, seed=4)
    fn = torch.compile(lambda t: group_norm(t, 4, weight, bias, 1e-5, silu=True), backend="aot_eager",
                       fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), group_norm(x, 4, weight, bias, 1e-5, silu=True), rtol=0, atol=0)


def test_network_channels_last_matches_contiguous():
    """The U-Net run channels_last (fused norm kernel, nearest upsampling) computes the contiguous network's
    function: fp32 to rounding; the nearest upsampling equals the transposed convolution it replaces exactly."""
    from aniso_fast.networks.unet import Conv2d, fashion_mnist_unet

    torch.manual_seed(0)
    net = fashion_mnist_unet().eval()
    x = torch.randn(3, 1, 28, 28)
    noise, labels = torch.rand(3), torch.nn.functional.one_hot(torch.tensor([0, 4, 9]), 10).float()
    with torch.no_grad():
        expected = net(x, noise, labels)
        net.to(memory_format=torch.channels_last)
        got = net(x.contiguous(memory_format=torch.channels_last), noise, labels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    up = Conv2d(6, 6, kernel=0, up=True)
    assert up.nearest_up
    z = torch.randn(2, 6, 5, 7)
    f = up.resample_filter
    transposed = torch.nn.functional.conv_transpose2d(z, (f * 4).expand(6, 1, -1, -1), groups=6, stride=2)
    assert torch.equal(up(z), transposed)
    assert not Conv2d(6, 6, kernel=0, up=True, resample_filter=(1, 3, 3, 1)).nearest_up


@needs_cpp
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_outlying_first_pixel_and_huge_negative_silu(isa, monkeypatch):
    """The float statistics of the AVX-512 variant shift each group by a mean of pixels spread over the image: an
    outlying first pixel (60 standard deviations) keeps fp32 accuracy. SiLU of a huge negative value is -0 (its
    exp overflows to inf), as in float64."""
    monkeypatch.setenv("ANISO_FAST_CPU_ISA", isa)
    if dispatch._C.cpu_isa() != isa:
        pytest.skip(f"this CPU has no {isa}")
    x, weight, bias = make(2, 32, 12, 12, torch.float32, seed=5)
    x[:, :, 0, 0] = 3.0 + 2.5 * 60
    for silu in (False, True):
        assert_close(group_norm(x, 8, weight, bias, 1e-6, silu=silu), x, 8, weight, bias, 1e-6, silu)
    huge = torch.full((32,), -1e38)
    y = group_norm(x, 8, torch.ones(32), huge, 1e-6, silu=True)
    assert y.abs().max().item() == 0.0  # -1e38 * sigmoid(-1e38) rounds to zero; the old clamp gave -0.6
