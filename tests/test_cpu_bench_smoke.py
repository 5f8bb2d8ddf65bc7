"""The CPU precision benchmarks still run, end to end, on a tiny bf16 checkpoint (seconds).

docs/PERFORMANCE.md's CPU precision figures and docs/CPU_PROFILE.md come from these scripts on
the 0.6B shape; here they must start, finish, and report what they measure: the exact split
within the contract of float32, bf16 visibly further off.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from test_bench_smoke import run_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.offline import make_random_reranker

    return make_random_reranker(tmp_path_factory.mktemp("models") / "tiny-bf16", "tiny", seed=3, dtype="bfloat16")


def test_cpu_modes_reports_each_mode_against_the_card(bf16_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "modes.json"
    run_script("bench/cpu_modes.py", "--model-dir", str(bf16_dir), "--modes", "float32,exact-bf16x3,bfloat16",
               "--docs", "3", "--rounds", "1", "--json", str(out))
    rows = {(r["workload"], r["mode"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(w, m) for w in ("short", "mixed") for m in ("float32", "exact-bf16x3", "bfloat16")}
    for workload in ("short", "mixed"):
        assert rows[workload, "exact-bf16x3"]["diff_fp32"] <= 1e-5
        assert rows[workload, "bfloat16"]["diff_fp32"] > 10 * rows[workload, "exact-bf16x3"]["diff_fp32"]
        assert all(rows[workload, m]["speedup"] > 0 for m in ("float32", "bfloat16"))


def test_fidelity_reports_every_mode_and_scale(bf16_dir: Path) -> None:
    stdout = run_script("bench/fidelity.py", "--model-dir", str(bf16_dir), "--queries", "2", "--docs", "6")
    rows = re.findall(r"^\| (\S+) \| (\S+) \| (\S+) \|", stdout, re.M)
    diffs = {(mode, scale): float(diff) for mode, scale, diff in rows if mode != "mode" and scale[0].isdigit()}
    assert set(diffs) == {(m, s) for m in ("bfloat16", "exact-bf16x2", "exact-bf16x3") for s in ("1", "4", "40")}
    assert all(diffs["exact-bf16x3", s] <= 1e-6 < diffs["bfloat16", s] for s in ("1", "4", "40"))


def test_cpu_profile_names_the_parts(bf16_dir: Path) -> None:
    stdout = run_script("bench/cpu_profile.py", "--model-dir", str(bf16_dir), "--workloads", "short", "--docs", "2")
    for part in ("linear", "attention", "norm", "silu", "other"):
        assert re.search(rf"^\| {part}.* \| \d+% \|$", stdout, re.M), part


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU needs a C++ compiler (apt-get install g++)")
def test_cpu_profile_of_the_compiled_path_names_the_parts_by_operator(bf16_dir: Path) -> None:
    stdout = run_script("bench/cpu_profile.py", "--model-dir", str(bf16_dir), "--workloads", "short", "--docs", "2",
                        "--compile")
    assert "compiled, rows attention" in stdout
    shares = {m[0]: float(m[1]) for m in re.findall(r"^\| (.+?) \| [\d.]+ \| (\d+)% \|$", stdout, re.M)}
    assert {"linear layers (aten::mm, addmm)", "attention (the CPU flash kernel)",
            "inductor's fused kernels (norms, rotary, gate, residuals)"} <= set(shares)
    assert shares["inductor's fused kernels (norms, rotary, gate, residuals)"] > 0  # the graphs really ran


def test_cpu_attention_compares_the_strategies_per_batch_shape(bf16_dir: Path) -> None:
    stdout = run_script("bench/cpu_attention.py", "--model-dir", str(bf16_dir), "--dtype", "float32",
                        "--rounds", "1", "--scale", "0.1")
    rows = re.findall(r"^\| (\w+): .* \| ([\d.]+)x \| (\S+) \|$", stdout, re.M)
    assert [name for name, _, _ in rows] == ["tiny", "even", "mixed"]
    assert all(float(ratio) > 0 and float(diff) < 1e-4 for _, ratio, diff in rows)  # fp32: the same log-odds


def test_cpu_gemm_compares_the_paths() -> None:
    stdout = run_script("bench/cpu_gemm.py", "--rows", "16", "--k", "64", "--n", "32", "--reps", "1")
    rows = {line.split(" | ")[1]: float(line.split(" | ")[-1].rstrip(" |")) for line in stdout.splitlines()
            if line.startswith("| 16 |")}
    compiler = bool(shutil.which("g++") or shutil.which("c++"))  # inductor's template needs one
    assert len(rows) == (7 if compiler else 5)
    for parts, tol in ((2, 2e-5), (3, 2e-6)):  # the template writes the fp32 accumulator, unrounded
        assert rows[f"exact-bf16x{parts}"] < tol
        if compiler:
            assert rows[f"exact-bf16x{parts}, template"] < tol
    assert rows["bf16 (in and out)"] > 1e-4  # what a rounded output looks like
