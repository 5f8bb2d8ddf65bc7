"""The benchmark scripts still run, end to end, on the tiny model (seconds, not a benchmark).

The figures in docs/PERFORMANCE.md come from these scripts on the 0.6B shape; a script that
no longer starts is found here, not on the next lent GPU. The scores they print are checked
too: the card's loop, the engine and each pair alone must agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_script(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_engine_bench_runs_every_workload_and_agrees_with_the_card(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    run_script("bench/engine.py", "--model-dir", str(tiny_model_dir), "--size", "tiny", "--device", "cpu",
               "--docs", "3", "--concurrent", "2", "--doc-tokens", "20", "--latency-reps", "2",
               "--workloads", "mixed,short,concurrent,lone,fixed", "--check-alone", "2", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    cards = [r for r in rows if r["path"] == "card"]
    alone = [r for r in rows if "max_alone_score_diff" in r]
    assert {r["workload"] for r in cards} == {"mixed", "short", "concurrent", "lone", "fixed"}
    assert all(r["speedup"] > 0 and r["max_score_diff"] < 1e-4 for r in cards)
    assert len(alone) == 5 and all(r["max_alone_score_diff"] < 1e-5 for r in alone)


def test_dtype_compare_reports_every_mode(tiny_model_dir: Path) -> None:
    stdout = run_script("bench/dtype_compare.py", "--model-dir", str(tiny_model_dir), "--docs", "3")
    table = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| short") or
             line.startswith("| mixed")]
    assert [(w.strip(), m.strip()) for w, m, *_ in table] == [
        (w, m) for w in ("short", "mixed") for m in ("float32", "bfloat16", "int8-dynamic")]
    for _, mode, _, _, diff, _ in table:
        assert (float(diff) == 0.0) == (mode.strip() == "float32")  # the other modes really ran


def test_dtype_compare_refuses_a_mode_list_without_its_baseline(tiny_model_dir: Path) -> None:
    done = subprocess.run([sys.executable, "bench/dtype_compare.py", "--model-dir", str(tiny_model_dir),
                           "--modes", "bfloat16"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "must start with float32" in done.stderr


def test_noisy_neighbour_runs_every_phase(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "noisy.json"
    run_script("bench/noisy_neighbour.py", "--model-dir", str(tiny_model_dir), "--seconds", "0.5",
               "--flood-docs", "3", "--flood-doc-tokens", "40", "--flood-lead-s", "0.1", "--rounds", "1",
               "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["phase"] for r in rows] == ["quiet alone", "flood alone, fair, 500 ms", "flood alone, fair, tokens only",
                                          "flood, fair, 500 ms", "flood, fair, tokens only", "quiet alone, after"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert [r["quiet_calls"] >= 1 for r in rows] == [True, False, False, True, True, True]


def test_scheduler_cost_reports_both_policies() -> None:
    rows = [line.split("|")[1:-1] for line in run_script("bench/scheduler_cost.py").splitlines()[2:]]
    assert [r[1].strip() for r in rows] == ["fifo", "fair"] * 4
    assert all(float(r[3]) >= 1.0 for r in rows)  # padding never below the real tokens


def test_long_documents_runs_every_path_and_chunks_the_long_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "long.json"
    run_script("bench/long_documents.py", "--model-dir", str(tiny_model_dir), "--size", "tiny", "--device", "cpu",
               "--lengths", "600", "--whole-max-length", "1024", "--chunked-max-length", "256",
               "--small-max-length", "128", "--neighbour-after-s", "0.01", "--compile", "off", "--json", str(out))
    rows = {r["path"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["base", "whole", "chunked", "small"]
    assert all(r["peak_rss_gb"] > 0 for r in rows.values())  # each path's own process, measured
    assert rows["whole"]["chunks"] == 1 and not rows["whole"]["truncated"]  # fits whole at 1024
    assert rows["chunked"]["chunks"] >= 3 and rows["small"]["chunks"] > rows["chunked"]["chunks"]
    for r in (rows["whole"], rows["chunked"], rows["small"]):
        assert not r["truncated"] and 0.0 < r["score"] < 1.0 and r["computed_tokens"] >= 600
        assert r["neighbour_s"] is not None and 0 <= r["best_chunk"] < r["chunks"]
