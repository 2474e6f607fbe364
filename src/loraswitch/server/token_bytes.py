"""The raw bytes of a token, for the `bytes` field of chat logprobs.

OpenAI gives each token's UTF-8 bytes so a client can rebuild characters that span tokens (an
emoji is often two or three byte-level tokens). Decoding such a token alone gives U+FFFD, whose
bytes say nothing, so the bytes come from the token itself: byte-level BPE vocabularies (GPT-2,
SmolLM2, Llama 3, Qwen) write each byte as one printable character of a fixed table, and
SentencePiece vocabularies with byte fallback (Llama 2, Mistral) write it as "<0xNN>".
"""

from __future__ import annotations

import re
from functools import cache

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's table from printable characters back to the bytes they stand for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _byte_level(tokenizer) -> bool:
    """Whether the vocabulary's pieces are GPT-2's byte characters (a ByteLevel decoder, alone or
    in a sequence; a slow GPT-2-style tokenizer has its `byte_decoder`)."""
    if hasattr(tokenizer, "byte_decoder"):
        return True
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The bytes token `token_id` stands for: an added or special token's text; a byte-level
    piece through the table; a SentencePiece piece with its word-start mark as the space it
    stands for (decoding it alone would strip that space: "▁hello" is " hello")."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return []
    if piece in _added(tokenizer):
        return list(piece.encode())
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        return [int(m.group(1), 16)]
    table = _byte_of_char()
    if _byte_level(tokenizer):
        if all(c in table for c in piece):
            return [table[c] for c in piece]
        return list(tokenizer.convert_tokens_to_string([piece]).encode())
    return list(piece.replace("\u2581", " ").encode())


def _added(tokenizer) -> dict:
    try:
        return tokenizer.get_added_vocab()
    except (AttributeError, NotImplementedError):
        return {}
