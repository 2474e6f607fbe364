"""Shared fixtures: tiny random Llama models (fast) and random PEFT adapters written to disk."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loraswitch.base import Base, load_base

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def real_base() -> Base:
    """The embedded default (SmolLM2-135M-Instruct); loads from the dequantized cache after the first time."""
    return load_base()


@pytest.fixture(scope="session")
def tokenizer(real_base):
    return real_base.tokenizer


def tiny_model(seed: int = 0, vocab: int = 49152, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=2, bos_token_id=1, pad_token_id=2, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_base(tokenizer) -> Base:
    return Base(model=tiny_model(), tokenizer=tokenizer, name="tiny-llama", source="random")


def write_adapter(model, path: Path, *, r=4, alpha=8, targets=("q_proj", "v_proj"), rslora=False, seed=0, **extra) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B for `model` to `path`."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                     init_lora_weights=False, task_type="CAUSAL_LM", base_model_name_or_path="tiny-llama", **extra)
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):  # an engine may have wrapped the linears
        if hasattr(module, "base") and isinstance(module.base, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, module.base)
    peft_model = get_peft_model(plain, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture
def adapter_dir(tmp_path, tiny_base) -> Path:
    """Three valid adapters of mixed rank, targets and scaling."""
    root = tmp_path / "adapters"
    write_adapter(tiny_base.model, root / "alpha", r=4, targets=("q_proj", "v_proj"), seed=1)
    write_adapter(tiny_base.model, root / "beta", r=8, alpha=4, targets=("q_proj", "k_proj", "o_proj", "down_proj"), seed=2)
    write_adapter(tiny_base.model, root / "gamma", r=2, alpha=16, rslora=True, targets=("gate_proj", "up_proj", "v_proj"), seed=3)
    return root
