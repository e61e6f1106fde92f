"""Plain eager calls of the fused ops run their kernel directly, everything else goes through the custom ops
(`ops.registration.is_plain_eager`): same results, and a sample job never imports torch._dynamo (the custom ops'
first call would, about 1.5 s)."""
import subprocess
import sys

import pytest
import torch

from aniso_fast import ops
from aniso_fast.geometry.bases import DCTBasis
from aniso_fast.ops import registration


def _inputs(requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 1, 8, 8, generator=gen, requires_grad=requires_grad)
    a = torch.rand(3, 2, generator=gen, dtype=torch.float64)
    return u, a


def test_which_path(monkeypatch):
    basis = DCTBasis(8, 8, 4)
    u, a = _inputs()
    expected = basis.combine(u, a)
    calls = []
    op = registration.separable_combine_op
    monkeypatch.setitem(registration.EAGER, "separable_combine",
                        registration._eager("separable_combine", lambda *args: calls.append(1) or op(*args)))
    assert torch.equal(basis.combine(u, a), expected) and calls == []  # eager: the kernel itself
    with torch.no_grad():
        ug, _ = _inputs(requires_grad=True)
        basis.combine(ug, a)
    assert calls == []  # grad mode off: nothing to record
    ug, _ = _inputs(requires_grad=True)
    out = basis.combine(ug, a)
    assert calls == [1] and out.requires_grad  # autograd records the custom op
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)


def test_is_plain_eager():
    x = torch.ones(2)
    assert registration.is_plain_eager(x, 3, None, "cpp")
    assert not registration.is_plain_eager(torch.nn.Parameter(torch.ones(2)))  # a subclass
    assert not registration.is_plain_eager(x, torch.ones(2, requires_grad=True))
    with torch.no_grad():
        assert registration.is_plain_eager(x, torch.ones(2, requires_grad=True))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():  # forward-mode AD: the custom op (which refuses it) rather than a lost tangent
        assert not registration.is_plain_eager(fwAD.make_dual(x, torch.ones(2)))
    seen = []
    torch.func.vmap(lambda t: seen.append(registration.is_plain_eager(t)) or t)(torch.ones(3, 2))
    assert seen == [False]  # a torch.func transform


@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])
def test_a_sample_job_does_not_import_dynamo(memory_format):
    code = ("import sys, aniso_fast; "
            f"p = aniso_fast.load(device='cpu', memory_format='{memory_format}'); p.sample(2, nfe=3, batch=2); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_compiled_calls_use_the_custom_ops():
    """Under torch.compile the custom op is traced (its fake implementation), with the same result."""
    basis = DCTBasis(8, 8, 4)
    u, a = _inputs()
    fn = torch.compile(lambda u, a: basis.combine(u, a), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(u, a), basis.combine(u, a), rtol=0, atol=0)
    assert ops.backends()["cpu"] == "cpp"
