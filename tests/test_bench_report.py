"""bench/report.py's throughput section (`--e2e`): its figures come from the results, and it replaces only its own
part of RESULTS.md."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402


def _bench(median, rounds=5, **extra):
    return {"name": "x", "stats": {"median": median, "rounds": rounds}, "extra_info": {"device": "cpu", **extra}}


def _data():
    sample = dict(suite="e2e", op="sample", nfe=9, batch=64, images=64, model="m", solver="heun", grid="uniform_t")
    return {"machine_info": {"aniso_fast": {"start": {"description": "a machine"}, "others_cpu_before": 0.01,
                                            "others_cpu_during": 0.02}},
            "benchmarks": [_bench(0.64, impl="fp32", precision="fp32", cpu_s_median=1.28, **sample),
                           _bench(0.32, impl="bf16-channels_last", precision="bf16", levels_moved_max=3,
                                  levels_moved_share=0.25, warmup_s=1.5, **sample),
                           _bench(0.128, suite="forward", op="flow", batch=64, images=64, layout="contiguous",
                                  threads=2, model="m", impl="contiguous"),
                           _bench(0.256, suite="forward", op="flow", batch=128, images=128, layout="contiguous",
                                  threads=2, model="m", impl="contiguous")]}


def test_e2e_section_figures():
    text = report.render_e2e(_data(), [], "results.json")
    assert text.startswith(report.E2E_BEGIN) and text.rstrip().endswith(report.E2E_END)
    assert "a machine" in text and "The machine was quiet" in text
    # 64 / 0.64 s (CPU 1.28 s / 64), 64 / 0.32 s
    assert "| cpu | 9 | 64 | `fp32` | 100.0 | 10 | 20 | 1.00x | – | – |" in text
    assert "| cpu | 9 | 64 | `bf16-channels_last` | 200.0 | 5 | – | 2.00x | 3, 25% | 1.5 |" in text
    assert "**Target on cpu, steady state** (issue 24: the default job, NFE 9, 64 images, at least 2.5x fp32 " \
           "eager's images per second; here a warm process's batch, the same code in both runs): 2.00x, MISSED." in text
    assert "| 64 | 2 |" in text and "| 128 | 2 |" in text  # ms per image: 128 ms / 64, 256 ms / 128
    assert "Fastest on cpu: B = 64, fp32 contiguous, 2 threads (2 ms/image)" in text


def test_splice_replaces_only_its_section():
    section = report.render_e2e(_data(), [], "results.json")
    doc = "# results\n\nkernel tables\n"
    once = report.splice_e2e(doc, section)
    assert once.startswith(doc) and once.endswith(section)
    newer = section.replace("a machine", "another machine")
    twice = report.splice_e2e(once + "\ntail\n", newer)
    assert twice == doc + "\n" + newer + "\ntail\n"


def _norm_and_ops():
    norm = dict(suite="norm", op="group_norm_silu", basis="bfloat16", size="32x28x28", batch=64, bytes=2e6)
    ops = dict(suite="ops", op="scale", basis="pca", size="64x64x3", batch=256)
    return {"machine_info": {}, "benchmarks": [
        _bench(0.5e-3, impl="torch-contiguous", **norm), _bench(8e-3, impl="torch-channels_last", **norm),
        _bench(4e-3, impl="torch-via-contiguous", **norm), _bench(1e-3, impl="fused", **norm),
        _bench(2e-3, impl="authors", **ops), _bench(3e-3, impl="reference", **ops), _bench(2.5e-3, impl="cpp", peak_bytes=0, out_bytes=0, scalar_bytes=0, **ops)]}


def test_norm_section_and_the_one_times_target():
    res = report.Results(_norm_and_ops())
    text = "\n".join(report.section_norm(res))
    # fused 1 ms against the best plain 4 ms (via contiguous); a contiguous input's 0.5 ms is shown, not counted
    assert "| group norm silu | bfloat16 | 64x32x28x28 | 8 | 4 | 1 | 0.5 | 4.00x (torch-via-contiguous) | 0.50x | " \
           "2.0 |" in text
    targets = "\n".join(report.section_targets(res))
    # the PCA case: 2.5 ms fused against the authors' 2 ms -> 0.80x, below 1.0x
    assert "| 1 of 2 cases at ≥ 1.0x; below: ops scale pca 64x64x3 B=256 0.80x | MISSED |" in targets


def test_profile_section():
    kinds = ["convolution", "GroupNorm (+ SiLU)", "elementwise and the rest"]
    row = dict(workload="sample, NFE 9, B 64", memory_format="contiguous", images=64)
    doc = {"command": "python bench/profile_network.py", "machine": "a machine", "threads": 2, "kinds": kinds,
           "rows": [{**row, "precision": "fp32", "seconds": 1.28,
                     "self_cpu_s": {"convolution": 1.92, "GroupNorm (+ SiLU)": 0.32, "elementwise and the rest": 0.32}},
                    {**row, "precision": "bf16", "memory_format": "channels_last", "seconds": 0.64,
                     "self_cpu_s": {"convolution": 0.96, "GroupNorm (+ SiLU)": 0.16, "elementwise and the rest": 0.0}}]}
    text = "\n".join(report.section_profile(doc))
    # 1.92 s / 64 images = 30 ms, 75% of 2.56 s; wall 1.28 s / 64 = 20 ms
    assert "| sample, NFE 9, B 64 | `fp32 contiguous` | 20 | 30 (75%) | 5 (13%) | 5 (13%) |" in text
    assert "fp32 time over bf16 time per kind: convolution 2.00x, GroupNorm (+ SiLU) 2.00x, elementwise and the " \
           "rest –." in text
    assert report.section_profile(None) == []


def test_cli_section():
    line = "64 samples, NFE 9 (heun, uniform_t grid), 2.00 s -> x.png"
    runs = [{"revision": "baseline", "round": r, "wall_s": w, "sampling_s": s, "images": 64, "nfe": 9, "printed": line}
            for r, (w, s) in enumerate([(5.0, 2.0), (6.0, 3.0), (4.0, 2.0)])]
    runs += [{"revision": "this", "round": r, "wall_s": 2.5, "sampling_s": 0.8, "images": 64, "nfe": 9, "printed": line}
             for r in range(3)]
    doc = {"machine": "a machine", "command": "python -m aniso_fast.sample", "runs": runs,
           "revisions": {"baseline": {"path": "/old", "commit": "abc"}, "this": {"path": "/new", "commit": "def"}}}
    text = "\n".join(report.section_cli(doc))
    assert "| baseline (`abc`) | 3 | 5.00 | 2.00 | 32.0 |" in text and "| this (`def`) | 3 | 2.50 | 0.80 | 80.0 |" in text
    assert "2.50x the images per second of sampling, 2.00x on the whole process's wall time" in text
    assert "2.5x the images per second of the revision before it, on the same CPU): 2.50x, PASS." in text
    assert "| `64 samples, NFE 9 (heun, uniform_t grid)` |" in text
    assert report.section_cli(None) == []


def test_compare_cli_bad_input(tmp_path, capsys):
    """bench/compare_cli.py: a --baseline that is not a checkout, or no rounds: one error line, exit 2, no file."""
    import pytest

    from bench import compare_cli

    out = tmp_path / "cli.json"
    for argv, option in ((["--baseline", str(tmp_path)], "--baseline"),
                         (["--baseline", str(ROOT), "--rounds", "0"], "--rounds")):
        with pytest.raises(SystemExit) as e:
            compare_cli.main([*argv, "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert ": error: " in err
        assert option in err
    assert not out.exists()
