"""The README's "Use with k-diffusion or diffusers" snippets run as written."""

import pytest
from helpers import readme_python_blocks

HEADING = "## Use with k-diffusion or diffusers"


def _snippets() -> list[str]:
    return readme_python_blocks(HEADING)


def test_the_section_has_both_snippets():
    blocks = _snippets()
    assert len(blocks) == 2 and "aniso_fast.k_diffusion" in blocks[0] and "EngineScheduler" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["k-diffusion", "diffusers"])
def test_snippet_runs(index):
    namespace = {}
    exec(compile(_snippets()[index], f"README.md snippet {index}", "exec"), namespace)
    assert namespace["x"].isfinite().all()
