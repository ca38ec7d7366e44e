"""Text to token ids and back: the course model's byte-level tokenizer, or a transformers tokenizer.

A checkpoint directory with tokenizer files (tokenizer.json, tokenizer.model, ...) gets transformers' tokenizer for
them. One without gets the course's byte-level tokenizer: ids 0-255 are the UTF-8 bytes, the config's bos and eos
ids (256 and 257 for the course model) are special, and ids above are unused. Both expose the same few methods.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class ByteTokenizer:
    """Bytes as tokens: encode(text) = [bos] + UTF-8 bytes; decode drops every id that is not a byte."""

    def __init__(self, bos_token_id: int = 256, eos_token_id: int = 257, vocab_size: int = 272):
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_token_id] if add_bos else []) + list(text.encode())

    def decode_bytes(self, ids) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)

    def decode(self, ids) -> str:
        """Text of the ids; a UTF-8 sequence cut short at the end decodes as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """A plain chat layout for a model with no chat template: "role: content" lines, then "assistant: "."""
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.encode(text)


class HFTokenizer:
    """transformers' tokenizer of the checkpoint, behind the same methods."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        self.inner = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.bos_token_id = self.inner.bos_token_id
        self.eos_token_id = self.inner.eos_token_id
        self.vocab_size = len(self.inner)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_bos)

    def decode(self, ids) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        if getattr(self.inner, "chat_template", None):
            ids = self.inner.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.encode(text)


def load_tokenizer(model_dir: str | Path, config=None):
    """The checkpoint's tokenizer: transformers' when it ships tokenizer files, else the byte-level one."""
    path = Path(model_dir)
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        return HFTokenizer(path)
    if config is None:
        from .model_runner import load_config

        config = load_config(path)
    if config.vocab_size < 258:
        raise ValueError(f"{path} has no tokenizer files, and its vocabulary ({config.vocab_size}) is too small for "
                         "the byte-level tokenizer (256 bytes + bos + eos)")  # fmt: skip
    bos = config.bos_token_id if config.bos_token_id is not None else 256
    eos = config.eos_token_id if config.eos_token_id is not None else 257
    if isinstance(eos, list):
        eos = eos[0]
    return ByteTokenizer(bos, eos, config.vocab_size)
