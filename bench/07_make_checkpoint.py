"""A seeded Llama-3.2-1B-shaped checkpoint with the course tokenizer's vocabulary, for timing serving engines.

    python3 bench/07_make_checkpoint.py OUT_DIR                 # hidden 2048, 16 layers, 32/8 heads, MLP 8192, bf16
    python3 bench/07_make_checkpoint.py OUT_DIR --small         # the same recipe at a toy size, for CPU smoke runs

Writes a standard Hugging Face checkpoint directory with transformers' `save_pretrained` (config.json,
generation_config.json, model.safetensors) and a byte-level `tokenizer.json` (ids 0-255 the UTF-8 bytes, 256 <bos>,
257 <eos>, 258-271 unused: the course model's ids), so that every engine — inferlab's, `transformers serve`, vLLM —
loads the same directory offline. It is built on the machine that uses it (a few seconds on a GPU), never committed,
never downloaded.

Its outputs are noise, but greedy decoding must agree between engines whose bf16 arithmetic differs. So the
weights are random (seeded) with one structure: the residual stream is dominated by the token embedding (the
layers' output projections are small), and the LM head maps each token to a "next" printable ASCII byte with a wide
logit margin. Every layer still runs in full — the cost per token is that of a Llama-3.2-1B — but argmax never
hinges on rounding, never picks <eos> (answers run to max_tokens) and never emits half a UTF-8 character (so one
token streams as one chunk in every server). `--check` reports the greedy margin and the agreement of bf16 with fp32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

VOCAB, BOS, EOS = 272, 256, 257
FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=8192)  # fmt: skip
SMALL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
PRINTABLE = list(range(32, 127))


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=None, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
                       mlp_bias=False, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                       torch_dtype="bfloat16", **shape)  # fmt: skip


@torch.no_grad()
def seeded_weights(model, seed: int, layer_scale: float = 0.1, margin: float = 12.0) -> None:
    """Every parameter from one seeded generator on the model's device (see the module docstring for the shape)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = model.config.hidden_size

    def normal(p, std):
        p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std)

    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            normal(p, layer_scale / p.shape[1] ** 0.5)  # each sublayer adds a small fraction to the residual
        elif "embed_tokens" in name or "lm_head" in name:
            continue
        else:
            normal(p, 1 / p.shape[1] ** 0.5)  # unit-variance activations into every nonlinearity
    embed = torch.randn(VOCAB, hidden, generator=gen, device=device, dtype=torch.float32)
    model.model.embed_tokens.weight.copy_(embed)
    # each token's next token: a seeded printable byte; the head row of a byte sums the directions of its tokens
    choice = torch.randint(len(PRINTABLE), (VOCAB,), generator=gen, device=device)
    following = torch.tensor(PRINTABLE, device=device)[choice]
    unit = embed / embed.norm(dim=1, keepdim=True)
    head = torch.zeros(VOCAB, hidden, device=device)
    head.index_add_(0, following, unit * margin / hidden**0.5)
    model.lm_head.weight.copy_(head)


def byte_tokenizer():
    """transformers' fast tokenizer with the course ids: byte b -> id b, <bos> prepended, byte-level decoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # The byte-level alphabet used by GPT-2-style tokenizers: printable bytes stand for themselves, the others for
    # the code points from 256 up, in byte order.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    alphabet = {b: chr(b) if b in kept else chr(next(extra)) for b in range(256)}
    specials = ["<bos>", "<eos>"] + [f"<unused{i}>" for i in range(VOCAB - 258)]
    vocab = {alphabet[b]: b for b in range(256)} | {s: 256 + i for i, s in enumerate(specials)}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens(specials)
    inner.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                         special_tokens=[("<bos>", BOS)])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<bos>", eos_token="<eos>",
                                   clean_up_tokenization_spaces=False)  # fmt: skip


def write_tokenizer(out_dir: str | Path) -> None:
    tokenizer = byte_tokenizer()
    text = "def main():\n    return 'héllo'"
    ids = tokenizer(text)["input_ids"]
    assert ids == [BOS, *text.encode()], f"the byte tokenizer must give <bos> + UTF-8 bytes, got {ids[:12]}"
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    tokenizer.save_pretrained(out_dir)


def build(out_dir: str | Path, small: bool = False, seed: int = 0, device: str | None = None) -> Path:
    from transformers import GenerationConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = llama_config(SMALL if small else FULL)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    seeded_weights(model, seed)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, do_sample=False)
    model.save_pretrained(out)
    write_tokenizer(out)
    (out / "inferlab_checkpoint.json").write_text(json.dumps({"seed": seed, "small": small, "made_by":
                                                              "bench/07_make_checkpoint.py"}) + "\n")  # fmt: skip
    return out


@torch.no_grad()
def check(out_dir: str | Path, tokens: int = 48) -> dict:
    """Greedy tokens of the checkpoint in bf16 and fp32 (transformers), their agreement, and the smallest margin."""
    from transformers import LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = LlamaForCausalLM.from_pretrained(out_dir, dtype=dtype, local_files_only=True).to(device).eval()
        ids = torch.tensor([[BOS, *b"def main():\n    "]], device=device)
        margins = []
        for _ in range(tokens):
            logits = model(ids).logits[0, -1].float()
            top = logits.topk(2).values
            margins.append((top[0] - top[1]).item())
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        runs[str(dtype)] = (ids[0].tolist(), min(margins))
        del model
    (fp32, m32), (bf16, m16) = runs.values()
    return {"agree": fp32 == bf16, "min_margin_fp32": m32, "min_margin_bf16": m16,
            "text": bytes(t for t in fp32 if t < 256).decode(errors="replace")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--small", action="store_true", help="a toy size with the same recipe, for CPU smoke runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="where to build (default: cuda if available)")
    parser.add_argument("--check", action="store_true", help="greedy agreement of bf16 with fp32, and the margin")
    args = parser.parse_args()
    began = time.perf_counter()
    out = build(args.out_dir, small=args.small, seed=args.seed, device=args.device)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**30
    print(f"wrote {out} ({size:.2f} GiB) in {time.perf_counter() - began:.1f} s")
    if args.check:
        print(json.dumps(check(out)))


if __name__ == "__main__":
    main()
