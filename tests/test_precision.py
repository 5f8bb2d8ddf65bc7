"""The CPU precision modes: the exact split equals fp32 arithmetic, and the choice of mode.

Scores are checked against the scoring contract's reference (each pair alone through
``Qwen3ForCausalLM`` in fp32) on a checkpoint saved in bf16, as Qwen publishes its own, so
every weight is bf16-exact and only the activations need splitting.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker import precision
from worker.precision import Plan, SplitLinear, bf16_matmul, resolve, split_bf16
from worker.runner import Item, ModelRunner
from worker.types import PromptOptions, Truncation

CPU = torch.device("cpu")


def bf16_exact(t: torch.Tensor) -> bool:
    return bool((t.bfloat16().float() == t).all())


@pytest.mark.parametrize("scale", [1e-20, 1e-3, 1.0, 7.0, 1e5, 1e30])
def test_three_parts_hold_every_fp32_value_exactly(scale: float) -> None:
    """Exact down to ~1e-33, where the remainders turn subnormal (far below any activation)."""
    x = torch.randn(257, 33, generator=torch.Generator().manual_seed(1)) * scale
    parts = split_bf16(x, 3)
    assert torch.equal(parts.sum(0), x)
    assert all(bf16_exact(p) for p in parts)


def test_two_parts_sum_exactly_and_lead_with_a_bf16_value() -> None:
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    parts = split_bf16(x, 2)
    assert torch.equal(parts.sum(0), x)
    assert bf16_exact(parts[0])
    assert not bf16_exact(parts[1])  # the kernel rounds it: what two parts give up


@pytest.mark.parametrize(("parts", "bf16_weight", "tol"), [(3, True, 2e-6), (3, False, 2e-6), (2, True, 2e-5)])
@torch.inference_mode()
def test_split_linear_matches_exact_arithmetic(parts: int, bf16_weight: bool, tol: float) -> None:
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(256, 96, bias=True)
    linear.weight.copy_(torch.randn(96, 256, generator=gen))
    if bf16_weight:
        linear.weight.copy_(linear.weight.bfloat16().float())
    x = torch.randn(5, 7, 256, generator=gen)
    exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    split = SplitLinear(linear, parts)
    assert len(split.weights) == (1 if bf16_weight else parts)
    if bf16_weight:  # held as loaded, not copied: the exact mode costs no weight memory
        assert split.weights[0].data_ptr() == linear.weight.data_ptr()
    err = float((split(x).double() - exact).abs().max() / exact.abs().max())
    plain = float((F.linear(x, linear.weight, linear.bias).double() - exact).abs().max() / exact.abs().max())
    rounded = float((F.linear(x.bfloat16(), linear.weight.bfloat16()).double() - exact).abs().max()
                    / exact.abs().max())
    assert err < tol
    assert rounded > 100 * tol  # bf16 itself is far off: the test can tell the two apart
    assert plain < tol


def test_the_bf16_matmul_setting_is_restored_even_on_error() -> None:
    before = torch.backends.mkldnn.matmul.fp32_precision
    with pytest.raises(RuntimeError), bf16_matmul():
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        raise RuntimeError("boom")
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    SplitLinear(torch.nn.Linear(8, 8), 2)(torch.randn(3, 8))
    assert torch.backends.mkldnn.matmul.fp32_precision == before  # attention stays fp32


def test_resolve_dtype_overrides_and_auto_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve("exact-bf16x3", "bfloat16", CPU) == Plan("bfloat16")  # --dtype wins
    assert resolve("exact-bf16x2", None, CPU) == Plan("float32", 2)
    assert resolve("bfloat16", None, CPU) == Plan("bfloat16")
    assert resolve("exact-bf16x3", None, torch.device("meta")) == Plan(None)  # CPU only
    with caplog.at_level(logging.INFO, logger="worker.precision"):
        plan = resolve(None, None, CPU)
    chosen = precision.default_precision(precision.cpu_capability())
    assert plan == (Plan("float32", precision.SPLIT_PARTS[chosen]) if chosen in precision.SPLIT_PARTS
                    else Plan(chosen))
    assert "CPU bf16 matrix units:" in caplog.text and "(auto)" in caplog.text
    with pytest.raises(ValueError, match="unknown precision"):
        resolve("fp8", None, CPU)


@pytest.mark.parametrize("capability", ["amx", "avx512_bf16", "none"])
def test_the_default_is_float32_on_every_cpu(capability: precision.Capability) -> None:
    """The split did not reliably beat fp32 on AMX (docs/PERFORMANCE.md): opt-in only."""
    assert precision.default_precision(capability) == "float32"


def test_an_explicit_split_on_an_fp32_checkpoint_splits_its_weights_too(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    Plan("float32", 3).apply(model)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, SplitLinear) and len(down.weights) == 3


def test_an_unknown_precision_is_refused_at_start(tmp_path: Path) -> None:
    from service import cli

    try:
        code = cli.main(["serve", "--model", "unused", "--grpc-port", "0", "--http-port", "0",
                         "--data-dir", str(tmp_path), "--precision", "fp8"])
    except SystemExit as exc:  # refused by the flag parser itself: --precision (--dtype) is an enum now
        code = exc.code
    assert code == 2


def test_capability_without_the_private_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch._C._cpu, "_get_cpu_capability")
    assert precision.cpu_capability() == "none"
    assert precision.default_precision("none") == "float32"


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.offline import make_random_reranker

    return make_random_reranker(tmp_path_factory.mktemp("models") / "tiny-bf16", "tiny", seed=5, dtype="bfloat16")


@pytest.mark.parametrize("mode", ["exact-bf16x3", "exact-bf16x2"])
def test_exact_modes_score_like_the_fp32_reference(bf16_model_dir: Path, mode: str) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(bf16_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner.load(str(bf16_model_dir), device="cpu", precision=mode, max_length=512)
    assert isinstance(runner.model.model.layers[0].mlp.down_proj, SplitLinear)
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "rivers " * 120, ""]
    prompts = runner.builder.build("capital of France", docs, None, PromptOptions(Truncation.NONE))
    out = runner.score_rows([Item(ids, prompts.shared_len) for ids in prompts.sequences])
    with torch.inference_mode():
        for ids, logit in zip(prompts.sequences, out.logits):
            ref = reference(torch.tensor([ids])).logits[0, -1]
            ref_logit = float(ref[9693] - ref[2152])
            assert abs(torch.sigmoid(torch.tensor(logit)) - torch.sigmoid(torch.tensor(ref_logit))) <= 1e-5
            assert logit == pytest.approx(ref_logit, abs=1e-4)


@pytest.mark.parametrize(("dtype", "precision", "compiled"), [
    ("bfloat16", None, True), ("float32", None, True), (None, "exact-bf16x3", False)])
def test_compile_defaults_on_but_for_the_split_modes(tiny_model_dir: Path, dtype: str | None, precision: str | None,
                                                     compiled: bool) -> None:
    """Measured to pay on the CPU for bf16 (1.2-1.4x) and fp32 (1.07-1.13x, docs/PERFORMANCE.md);
    the split modes toggle a global oneDNN setting around each GEMM, which a graph would not."""
    runner = ModelRunner.load(str(tiny_model_dir), device="cpu", dtype=dtype, precision=precision, max_length=512)
    assert runner.scorer.compiled is (compiled and bool(shutil.which("g++")))
    assert ModelRunner.load(str(tiny_model_dir), device="cpu", dtype=dtype, max_length=512,
                            compile=False).scorer.compiled is False  # --no-compile wins


def test_no_cpu_compiler_means_eager_by_default(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A host (a slim image, say) without the C++ compiler inductor needs: the default is eager,
    said once at load, instead of a compile that fails in every warm-up; an explicit
    ``compile=True`` still tries (and falls back, below)."""
    from torch._inductor import cpp_builder

    def no_compiler() -> str:
        raise cpp_builder.exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with caplog.at_level(logging.INFO, logger="worker.runner"):
        runner = ModelRunner.load(str(tiny_model_dir), device="cpu", dtype="float32", max_length=512)
    assert not runner.scorer.compiled
    assert "no C++ compiler" in caplog.text and "install g++" in caplog.text
    assert ModelRunner.load(str(tiny_model_dir), device="cpu", dtype="float32", max_length=512,
                            compile=True).scorer.compiled


def test_a_compile_that_cannot_build_falls_back_to_eager(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """No C++ compiler on the host, say: the warm-up logs it and serves eager, exact."""
    def no_compiler(fn: object, **kwargs: object) -> object:
        def fail(*args: object, **kw: object) -> object:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    runner = ModelRunner.load(str(tiny_model_dir), device="cpu", dtype="float32", max_length=512, compile=True)
    assert runner.scorer.compiled
    with caplog.at_level(logging.WARNING, logger="worker.runner"):
        runner.warmup()
    assert not runner.scorer.compiled and "No working C++ compiler" in caplog.text
    eager = ModelRunner.load(str(tiny_model_dir), device="cpu", dtype="float32", max_length=512, compile=False)
    prompts = runner.builder.build("capital of France", ["Paris.", "Bananas are yellow."], None)
    items = [Item(ids, prompts.shared_len) for ids in prompts.sequences]
    assert runner.score_rows(items).logits == eager.score_rows(items).logits
