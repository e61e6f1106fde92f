"""What several test files (and bench/) do the same way: a CLI's one-line error, the README's Python snippets, and
k-diffusion's sampling module loaded on its own (the solver oracle and a peer in bench/test_bench_peers.py)."""
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def one_line_error(capsys, *words):
    """The captured stderr is one line `error: ...`, no traceback, naming every word given."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def readme_python_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section under `heading`, as written."""
    text = README.read_text()
    section = text[text.index(heading):]
    section = section[:section.index("\n## ", len(heading))]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def kdiffusion_sampling():
    """k_diffusion/sampling.py on its own, or None when k-diffusion is not installed: the package __init__ imports
    heavy optional deps, and its utils.py needs torchvision, so sampling.py runs against a stub package holding the
    one helper it uses."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    if "_kdiffusion_oracle.sampling" in sys.modules:
        return sys.modules["_kdiffusion_oracle.sampling"]
    pkg = types.ModuleType("_kdiffusion_oracle")
    pkg.__path__ = []
    pkg.utils = types.ModuleType("_kdiffusion_oracle.utils")
    pkg.utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.setdefault("_kdiffusion_oracle", pkg)
    sys.modules.setdefault("_kdiffusion_oracle.utils", pkg.utils)
    path = os.path.join(spec.submodule_search_locations[0], "sampling.py")
    mod_spec = importlib.util.spec_from_file_location("_kdiffusion_oracle.sampling", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    sys.modules["_kdiffusion_oracle.sampling"] = module
    return module
