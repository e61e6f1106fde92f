"""load_edm_network: round trip through a pickle written in EDM's exact format, and refusal of everything else.

The pickles are written without EDM: a throw-away `torch_utils/persistence.py` in a temporary directory provides
`_reconstruct_persistent_obj` (so pickle records the global under EDM's name) and a `persistent_class` that
reduces an instance the way EDM's does, `(_reconstruct_persistent_obj, (meta,))` with
`meta = {type: 'class', version: 6, module_src, class_name, state: <the module's __dict__>}`. Its `module_src`
would leave a marker file if anything executed it; the package is removed from sys.path/sys.modules before loading.
"""
import io
import os
import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch

from aniso_fast.networks.edm_pickle import EDMPickleError, load_edm_network
from aniso_fast.networks.unet import SongUNet

FAKE_PERSISTENCE = '''
"""Stand-in for NVlabs/edm torch_utils/persistence.py: same global name and meta layout, no code loading."""
_version = 6


def _reconstruct_persistent_obj(meta):
    raise RuntimeError("EDM's reconstruct hook must never be called by the loader under test")


def persistent_class(orig_class, module_src, class_name=None):
    class Persistent(orig_class):
        def __reduce__(self):
            fields = list(super().__reduce__()) + [None, None, None]
            meta = dict(type="class", version=_version, module_src=module_src,
                        class_name=class_name or orig_class.__name__, state=fields[2])
            return (_reconstruct_persistent_obj, (meta,), None, fields[3], fields[4])

    Persistent.__name__ = orig_class.__name__
    return Persistent
'''

SMALL = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, model_channels=16,
             channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[16], dropout=0.13)
PRECOND = dict(img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, sigma_min=0.002, sigma_max=80.0,
               sigma_data=0.5, model_type="SongUNet")


pytestmark = pytest.mark.usefixtures("one_thread")


class EDMPrecond(torch.nn.Module):
    """The attributes and submodule EDM's EDMPrecond has (its forward is not needed here)."""

    def __init__(self, model, **settings):
        super().__init__()
        for k in ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data"):
            setattr(self, k, settings[k])
        self.model = model


class EDMLoss:
    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


@pytest.fixture
def fake_edm(tmp_path):
    """Yields `(write, marker)`: `write(path, ...)` pickles a randomly initialised small SongUNet in EDM's format and
    returns the source net; its keywords swap the model/precond class names, the top-level key, the pickle protocol
    or the SongUNet arguments recorded in the pickle. `marker` appears if anything executes `module_src`."""
    pkg = tmp_path / "fake_edm_site"
    (pkg / "torch_utils").mkdir(parents=True)
    (pkg / "torch_utils" / "__init__.py").write_text("")
    (pkg / "torch_utils" / "persistence.py").write_text(FAKE_PERSISTENCE)
    marker = tmp_path / "MODULE_SRC_WAS_EXECUTED"
    module_src = textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("executed")
        raise SystemExit("EDM module source executed")
        class SongUNet: pass
    """)
    sys.path.insert(0, str(pkg))
    try:
        import torch_utils.persistence as persistence
    finally:
        sys.path.remove(str(pkg))

    def persist(obj, init_kwargs, class_name=None):
        obj.__class__ = persistence.persistent_class(type(obj), module_src, class_name)
        obj._init_args = ()
        obj._init_kwargs = dict(init_kwargs)
        return obj

    def write(path, model_class_name="SongUNet", top_key="ema", precond_name="EDMPrecond", protocol=None,
              recorded_overrides=None):
        torch.manual_seed(0)
        net = SongUNet(**SMALL)
        with torch.no_grad():  # trained-like weights: EDM zero-initialises the last conv of every block
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model_kwargs = {k: v for k, v in SMALL.items() if k not in ("img_resolution", "in_channels", "out_channels",
                                                                   "label_dim")}
        precond = EDMPrecond(net, **PRECOND).eval().requires_grad_(False)  # as EDM's training loop saves it
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.ModuleDict):
                continue  # torch containers pickle as themselves, like in EDM
            kwargs = dict(skip_scale=np.sqrt(0.5), init_attn=dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2)))
            if name == "":
                kwargs = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=10, **model_kwargs)
                kwargs.update(recorded_overrides or {})
            persist(module, kwargs, class_name=model_class_name if name == "" else None)
        persist(precond, dict(PRECOND, model_type=model_class_name, **model_kwargs), class_name=precond_name)
        loss_fn = persist(EDMLoss(), dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5))
        data = {top_key: precond, "loss_fn": loss_fn, "augment_pipe": None,
                "dataset_kwargs": dict(class_name="training.dataset.ImageFolderDataset", xflip=False)}
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=protocol)
        return net

    yield write, marker
    for name in [m for m in sys.modules if m == "torch_utils" or m.startswith("torch_utils.")]:
        del sys.modules[name]


def _forget_fake_package():
    for name in [m for m in sys.modules if m == "torch_utils" or m.startswith("torch_utils.")]:
        del sys.modules[name]
    assert not any("fake_edm_site" in p for p in sys.path)


def _refuses(path, match):
    with pytest.raises(EDMPickleError, match=match) as info:
        load_edm_network(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, pickle.UnpicklingError)
    return info.value


@pytest.mark.parametrize("protocol", sorted({2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL}))
def test_round_trip(fake_edm, tmp_path, monkeypatch, protocol):
    write, marker = fake_edm
    path = tmp_path / "edm-small-32x32-cond-vp.pkl"
    src = write(path, protocol=protocol)
    _forget_fake_package()

    def unrestricted(*args, **kwargs):
        raise AssertionError("unrestricted pickle.load called")

    monkeypatch.setattr(pickle, "load", unrestricted)
    monkeypatch.setattr(pickle, "loads", unrestricted)
    state = torch.random.get_rng_state()
    net, info = load_edm_network(path)
    assert torch.equal(torch.random.get_rng_state(), state)  # loading leaves the global RNG alone
    assert not marker.exists() and "torch_utils" not in sys.modules

    assert isinstance(net, SongUNet) and not net.training
    assert {k: info[k] for k in PRECOND} == PRECOND
    assert info["model_config"] == SongUNet(**SMALL).config() == net.config()
    assert info["pickle_keys"] == ["augment_pipe", "dataset_kwargs", "ema", "loss_fn"]
    assert info["persistence_version"] == 6

    ours, theirs = net.state_dict(), src.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == torch.float32 for k in ours)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    noise = torch.randn(2, generator=g)
    labels = torch.eye(10)[[3, 7]]
    augment = torch.randn(2, 9, generator=g)
    with torch.no_grad():
        assert torch.equal(net(x, noise, labels, augment), src.eval()(x, noise, labels, augment))


def test_file_object(fake_edm, tmp_path):
    write, marker = fake_edm
    path = tmp_path / "net.pkl"
    write(path)
    _forget_fake_package()
    net, info = load_edm_network(io.BytesIO(path.read_bytes()))
    assert info["label_dim"] == 10 and not marker.exists()


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "nested"])
def test_refuses_code_execution(tmp_path, kind):
    marker = tmp_path / "PWNED"
    if kind == "os.system":
        payload, match = _Evil(os.system, f"touch {marker}"), r"refusing to load global '(posix|nt)\.system'"
    else:
        payload = _Evil(eval, f"open({str(marker)!r}, 'w').write('x')")
        match = r"refusing to load global 'builtins\.eval'"
    data = {"ema": payload} if kind != "nested" else {"ema": {"state": {"_init_kwargs": {"x": [1, payload]}}}}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(data))
    _refuses(path, match)
    assert not marker.exists()


def test_refuses_code_in_storage_bytes(tmp_path):
    """torch pickles a storage as torch.save() bytes; those are loaded with torch's weights_only unpickler."""
    marker = tmp_path / "PWNED"
    inner = io.BytesIO()
    torch.save(_Evil(os.system, f"touch {marker}"), inner, _use_new_zipfile_serialization=False)
    path = tmp_path / "evil-storage.pkl"
    path.write_bytes(pickle.dumps({"ema": _Evil(torch.storage._load_from_bytes, inner.getvalue())}))
    _refuses(path, "not a readable EDM network pickle")
    assert not marker.exists()


def test_refuses_truncated_file(fake_edm, tmp_path):
    write, _ = fake_edm
    path = tmp_path / "net.pkl"
    write(path)
    _forget_fake_package()
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        _refuses(path, "not a readable EDM network pickle")


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(4096), b"", b"hello, this is not a pickle\n"])
def test_refuses_non_pickles(tmp_path, content):
    path = tmp_path / "noise.pkl"
    path.write_bytes(content)
    _refuses(path, "not a readable EDM network pickle")


def test_refuses_other_networks(fake_edm, tmp_path):
    write, _ = fake_edm
    write(tmp_path / "adm.pkl", model_class_name="DhariwalUNet")
    write(tmp_path / "vp.pkl", precond_name="VPPrecond")
    write(tmp_path / "no-ema.pkl", top_key="model")
    _forget_fake_package()
    _refuses(tmp_path / "adm.pkl", "DhariwalUNet; only SongUNet .* supported yet")
    _refuses(tmp_path / "vp.pkl", "VPPrecond; only EDMPrecond")
    _refuses(tmp_path / "no-ema.pkl", r"key 'ema'.*\['augment_pipe', 'dataset_kwargs', 'loss_fn', 'model'\]")


def test_refuses_non_dict(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    _refuses(path, "key 'ema'.*list")


def test_refuses_mismatched_weights(fake_edm, tmp_path):
    """Recorded SongUNet arguments that do not fit the tensors, or that our SongUNet lacks, are refused."""
    write, _ = fake_edm
    write(tmp_path / "blocks.pkl", recorded_overrides=dict(num_blocks=2))
    write(tmp_path / "unknown.pkl", recorded_overrides=dict(use_magic=True))
    _forget_fake_package()
    _refuses(tmp_path / "blocks.pkl", "weights do not fit SongUNet")
    _refuses(tmp_path / "unknown.pkl", r"\['use_magic'\].*not supported")
