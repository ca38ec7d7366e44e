"""Logits to tokens: greedy, temperature and top-p (nucleus) sampling, seeded per request.

A request with a seed owns a torch.Generator seeded with it, and draws from nothing else: its tokens are the same
whatever else shares its batch and however the steps fall. Requests without a seed share the sampler's generator.
Greedy rows (temperature 0) never draw at all.
"""

from __future__ import annotations

import torch

from .types import SamplingParams


class Sampler:
    def __init__(self, device: str | torch.device = "cpu", seed: int | None = None):
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def generator_for(self, seed: int | None) -> torch.Generator | None:
        """A request's own generator (None without a seed: it then shares the sampler's)."""
        if seed is None:
            return None
        generator = torch.Generator(self.device)
        generator.manual_seed(seed)
        return generator

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> list[int]:
        """logits float32 [N, V], one SamplingParams and generator (or None) per row -> N token ids."""
        tokens = logits.argmax(dim=-1)
        drawn = [i for i, p in enumerate(params) if p.temperature > 0]
        if not drawn:
            return tokens.tolist()
        rows = logits[drawn] / torch.tensor([params[i].temperature for i in drawn], device=logits.device)[:, None]
        probs = rows.softmax(dim=-1)
        top_p = torch.tensor([params[i].top_p for i in drawn], device=logits.device)
        if bool((top_p < 1).any()):
            probs = nucleus(probs, top_p)
        for row, i in enumerate(drawn):
            generator = generators[i] if generators[i] is not None else self.generator
            tokens[i] = torch.multinomial(probs[row], 1, generator=generator)[0]
        return tokens.tolist()


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of most likely tokens whose probabilities sum to >= top_p; renormalize.

    probs [N, V] (rows sum to 1), top_p [N] in (0, 1]. The most likely token is always kept.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens more likely than this one
    sorted_probs = sorted_probs.masked_fill(before >= top_p[:, None], 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)
