"""No numeric change under refactoring: every shipped model with every sampler it takes gives the images recorded
by tests/golden/record.py (the `sample` CLI's own argument lists, so the record holds across any change below the
CLI). Byte-identical on the kind of machine the record was made on (torch version, CPU vendor and vector ISA);
elsewhere a float ulp can flip a rounding, so there at most 0.5% of pixels may move, by at most 2 levels."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
_spec = importlib.util.spec_from_file_location("golden_record", GOLDEN / "record.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)

_DOC = json.loads((GOLDEN / "cases.json").read_text())
_SAME_MACHINE = _DOC["machine"] == record.machine()


@pytest.fixture(scope="module")
def golden_images():
    with np.load(GOLDEN / "images.npz") as f:
        return {k: f[k] for k in f.files}


def test_the_record_covers_every_shipped_model_and_solver():
    from aniso_fast import store as models

    cases = [c["argv"] for c in _DOC["cases"]]
    assert {c[c.index("--model") + 1] for c in cases} == set(models.MODELS)
    solvers = {c[c.index("--solver") + 1] for c in cases if "--solver" in c}
    assert solvers == set(record.SOLVERS)


@pytest.mark.parametrize("case", _DOC["cases"], ids=lambda c: " ".join(c["argv"][1:2] + c["argv"][4:]))
def test_images_match_the_record(case, golden_images):
    got = record.run_case(case["argv"])
    assert got is not None, "the sample CLI refused a case it ran when the record was made"
    want = golden_images[case["key"]]
    assert got.shape == want.shape and got.dtype == want.dtype
    if _SAME_MACHINE:
        assert np.array_equal(got, want), f"{(got != want).sum()} pixels differ from the record"
    else:
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert (diff > 0).mean() <= 0.005 and diff.max() <= 2, f"max diff {diff.max()}, {(diff > 0).mean():.3%} moved"
