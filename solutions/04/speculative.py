"""Exercise 04 reference solution: speculative decoding, greedy and sampled, with rollback of both KV caches.

A cheap draft model proposes k tokens one at a time; the target scores all of them in one forward pass over k + 1
positions, which costs about as much as one decode step when decoding is bound by reading the weights. Each draft
token x is kept with probability min(1, p(x) / q(x)); the first rejected one is replaced by a token drawn from
normalize(max(0, p - q)), and when all k are kept the target's last row gives a bonus token. The tokens that come out
follow the target's distribution exactly, whatever the draft. With greedy decoding this reduces to: keep draft tokens
while they equal the target's argmax, then emit the target's argmax.

The loop keeps one host synchronisation per round (reading how many tokens were accepted, to roll the caches back);
everything else, the draft's choices included, stays on the device. The public functions check their inputs, which
costs synchronisations (reading a minimum, a maximum, a sum back to Python); the loop calls the rules unchecked on
inputs it made itself: on a GPU, where a small model's round is bound by the host, every synchronisation shows.

Greedy decoding with models that offer `forward_at` (fixtures/speculative_models.py's CachedModel) goes further: the
committed length lives on the device, so a whole round (k draft steps, the verify pass, the acceptance count, the
rollback) is one function of device tensors with no synchronisation, recorded once as a CUDA graph on a GPU. The host
replays as many rounds as are surely needed (each emits at most k + 1 tokens), then reads the length once. The
rounds, tokens and statistics are those of the loop above; only the draft's first step of a round differs: it is
always fed the two newest committed tokens (one of them again, to the same cache slot), so that every round has the
same shape whether or not the last one kept all k drafts.
"""

from __future__ import annotations

import weakref

import torch

from fixtures.speculative_models import record_graph

PAD = -1  # fills the rows of rejection_sample and greedy_verify past the last emitted token
_SUM_TOLERANCE = 1e-3


def rejection_sample(
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Verify k drafted tokens per request against the target: [B, k+1] int64 of kept tokens, one more, then -1.

    draft_token_ids [B, k] int64, drawn from draft_probs; draft_probs [B, k, V] (row i: q for draft token i);
    target_probs [B, k+1, V] (row i: p for position i; row k: the position after the last draft token).
    """
    shape = draft_probs.shape if isinstance(draft_probs, torch.Tensor) else None
    batch, k, vocab = _check_draft(draft_token_ids, shape)
    _check_probs("draft_probs", draft_probs, (batch, k, vocab))
    _check_probs("target_probs", target_probs, (batch, k + 1, vocab))
    if draft_probs.device != draft_token_ids.device or target_probs.device != draft_token_ids.device:
        raise ValueError("rejection_sample: draft_token_ids, draft_probs and target_probs must share one device")

    return _rejection_sample(draft_token_ids.long(), draft_probs, target_probs, generator)


def _rejection_sample(ids, draft_probs, target_probs, generator) -> torch.Tensor:
    """rejection_sample without the checks (they synchronise with the GPU): for the decode loop's own inputs."""
    batch, k = ids.shape
    vocab = draft_probs.shape[-1]
    p = target_probs[:, :k].float().gather(-1, ids[..., None]).squeeze(-1)  # [B, k] p(x_i)
    q = draft_probs.float().gather(-1, ids[..., None]).squeeze(-1)  # [B, k] q(x_i)
    ratio = p / q.clamp_min(torch.finfo(torch.float32).tiny)  # p == q gives exactly 1: always kept
    uniform = torch.rand(batch, k, generator=generator, device=ids.device)
    kept = (uniform < ratio).long().cumprod(dim=1)  # kept up to the first rejection
    accepted = kept.sum(dim=1)  # [B], 0 .. k

    # The distribution of the token after the kept ones: the residual max(0, p - q) at the first rejection, the
    # target's row k when all k were kept.
    row = accepted.clamp(max=k - 1)[:, None, None].expand(batch, 1, vocab)
    residual = (target_probs.float().gather(1, row) - draft_probs.float().gather(1, row)).clamp_min(0).squeeze(1)
    bonus = target_probs[:, k].float()
    final = torch.where((accepted == k)[:, None], bonus, residual)
    # An empty residual (p <= q everywhere: only through rounding, as p and q each sum to 1 within the tolerance)
    # falls back to p itself, the stub's rule.
    empty = final.sum(-1, keepdim=True) <= 0
    final = torch.where(empty, target_probs.float().gather(1, row).squeeze(1), final)
    last = torch.multinomial(final, 1, generator=generator).squeeze(1)  # [B]
    return _assemble(ids, accepted, last)


def greedy_verify(draft_token_ids: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Greedy verification: [B, k+1] int64, the draft tokens equal to the target's argmax up to the first mismatch,
    then the target's argmax at that position (or at row k when all matched), then -1.

    draft_token_ids [B, k] int64; target_logits [B, k+1, V] (row i scores position i).
    """
    shape = target_logits.shape if isinstance(target_logits, torch.Tensor) else None
    batch, k, _ = _check_draft(draft_token_ids, shape, extra=1)  # target_logits' shape too: [B, k + 1, V]
    ids = draft_token_ids.long()
    best = target_logits.argmax(-1)  # [B, k+1]
    accepted = (ids == best[:, :k]).long().cumprod(dim=1).sum(dim=1)
    return _assemble(ids, accepted, best.gather(1, accepted[:, None]).squeeze(1))


def _assemble(ids: torch.Tensor, accepted: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    batch, k = ids.shape
    column = torch.arange(k + 1, device=ids.device)[None]
    padded = torch.cat([ids, ids.new_full((batch, 1), PAD)], dim=1)
    out = torch.where(column < accepted[:, None], padded, PAD)
    return torch.where(column == accepted[:, None], last[:, None], out)


def _check_draft(draft_token_ids, other_shape, extra=0) -> tuple[int, int, int]:
    if not isinstance(draft_token_ids, torch.Tensor) or draft_token_ids.dim() != 2:
        raise ValueError(f"draft_token_ids must be a [B, k] tensor, got {getattr(draft_token_ids, 'shape', None)}")
    if draft_token_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"draft_token_ids must be int64 token ids, got {draft_token_ids.dtype}")
    batch, k = draft_token_ids.shape
    if k < 1:
        raise ValueError("k must be at least 1: draft_token_ids is [B, 0]")
    if other_shape is None or len(other_shape) != 3:
        raise ValueError(f"expected a [B, k{'+1' if extra else ''}, V] tensor of probabilities or logits beside "
                         f"draft_token_ids, got {None if other_shape is None else list(other_shape)}")  # fmt: skip
    vocab = other_shape[2]
    if other_shape[0] != batch or other_shape[1] != k + extra:
        raise ValueError(f"draft_token_ids is [B={batch}, k={k}] but the other tensor is {list(other_shape)}: "
                         f"mismatched batch or k")  # fmt: skip
    if batch and (int(draft_token_ids.min()) < 0 or int(draft_token_ids.max()) >= vocab):
        raise ValueError(f"draft_token_ids must lie in [0, {vocab}): got {int(draft_token_ids.min())} .. "
                         f"{int(draft_token_ids.max())}")  # fmt: skip
    return batch, k, vocab


def _check_probs(name: str, probs, shape: tuple[int, int, int]) -> None:
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor")
    if tuple(probs.shape) != shape:
        raise ValueError(f"{name} must be [B, rows, V] = {list(shape)}, got {list(probs.shape)}: "
                         "mismatched k or vocabulary")  # fmt: skip
    if probs.numel() == 0:
        return
    sums = probs.float().sum(-1)
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        raise ValueError(f"{name} must hold finite, non-negative probabilities")
    if bool(((sums - 1).abs() > _SUM_TOLERANCE).any()):
        worst = float((sums - 1).abs().max())
        raise ValueError(f"{name} rows must sum to 1 (probabilities, not logits): off by up to {worst:.3g}")


def speculative_generate(
    target,
    draft,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    k: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Generate `max_new_tokens` tokens after input_ids [1, T] with `target`, drafting `k` tokens a round with `draft`.

    Returns (tokens [1, max_new_tokens] int64, stats) where stats = {"drafted": tokens drafted, "accepted": drafted
    tokens the target kept, "target_forwards": target forward passes, the prefill included}.
    """
    _check_generate(target, draft, input_ids, max_new_tokens, k, temperature)
    if temperature == 0 and hasattr(target, "forward_at") and hasattr(draft, "forward_at"):
        return _greedy_rounds_on_device(target, draft, input_ids, max_new_tokens, k)
    prompt_len = input_ids.shape[1]
    capacity = prompt_len + max_new_tokens + k
    sequence = torch.empty(1, capacity, dtype=torch.long, device=input_ids.device)
    sequence[:, :prompt_len] = input_ids
    target_cache, draft_cache = target.new_cache(1, capacity), draft.new_cache(1, capacity)
    greedy = temperature == 0

    def choose(logits):  # [1, V] -> [1, 1] token and the distribution it came from (None when greedy)
        if greedy:
            return logits.argmax(-1, keepdim=True), None
        probs = (logits.float() / temperature).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator), probs

    sequence[:, prompt_len : prompt_len + 1] = choose(target.forward(input_ids, target_cache)[:, -1])[0]
    stats = dict(drafted=0, accepted=0, target_forwards=1)
    length = prompt_len + 1  # tokens committed: the prompt and the tokens emitted so far
    while length < prompt_len + max_new_tokens:
        # Draft k tokens. The draft's cache holds a prefix of the committed tokens: feed it the rest (the last
        # committed token; two tokens after a round that kept all k drafts; the whole prompt in the first round).
        draft_probs = []
        feed = sequence[:, draft_cache.seq_len : length]
        for i in range(k):
            token, probs = choose(draft.forward(feed, draft_cache)[:, -1])
            sequence[:, length + i : length + i + 1] = token
            draft_probs.append(probs)
            feed = token
        drafted = sequence[:, length : length + k]
        # Verify: one target pass over the last committed token and the k drafts scores k + 1 positions.
        target_logits = target.forward(sequence[:, length - 1 : length + k], target_cache)
        stats["target_forwards"] += 1
        if greedy:  # greedy_verify's rule, without its checks: the drafts are in place, one token follows them
            best = target_logits.argmax(-1)  # [1, k+1]
            accepted = int((drafted == best[:, :k]).cumprod(dim=1).sum())  # the round's one host synchronisation
            sequence[:, length + accepted : length + accepted + 1] = best[:, accepted : accepted + 1]
        else:
            target_probs = (target_logits.float() / temperature).softmax(-1)
            row = _rejection_sample(drafted, torch.stack(draft_probs, dim=1), target_probs, generator)
            accepted = int((row >= 0).sum()) - 1  # the round's one host synchronisation
            sequence[:, length : length + accepted + 1] = row[:, : accepted + 1]
        stats["drafted"] += k
        stats["accepted"] += accepted
        length += accepted + 1
        # Roll back: both caches may keep only committed tokens, and not the newest one (it is fed next round).
        target_cache.seq_len = length - 1
        draft_cache.seq_len = min(draft_cache.seq_len, length - 1)
    return sequence[:, prompt_len : prompt_len + max_new_tokens].clone(), stats


_ROUNDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # target -> {(draft, k, cache buffers): _Rounds}


def _greedy_rounds_on_device(target, draft, input_ids, max_new_tokens: int, k: int) -> tuple[torch.Tensor, dict]:
    """speculative_generate, greedy, with the committed length on the device: see the module docstring."""
    prompt_len = input_ids.shape[1]
    end = prompt_len + max_new_tokens
    capacity = end + k
    target_cache, draft_cache = target.new_cache(1, capacity), draft.new_cache(1, capacity)
    on_gpu = input_ids.is_cuda
    key = (id(draft), k, target_cache.keys.data_ptr(), draft_cache.keys.data_ptr())
    per_target = _ROUNDS.setdefault(target, {}) if on_gpu else {}
    rounds = per_target.get(key)
    if rounds is None:  # a GPU cache's buffers come back from the model's pool: recorded rounds stay valid
        rounds = per_target[key] = _Rounds(target, draft, k, target_cache.keys.shape[3])
    # Prefill: the target holds the prompt and gives the first token; the draft holds all but the newest two
    # committed tokens (the invariant at the start of every round).
    first = target.forward(input_ids, target_cache)[:, -1:].argmax(-1)
    if prompt_len > 1:
        draft.forward(input_ids[:, :-1], draft_cache)
    committed = rounds.start(input_ids, first)
    count = 0
    while committed < end:
        needed = -(-(end - committed) // (k + 1))  # each round emits at most k + 1 tokens: all of these are needed
        for _ in range(needed):
            rounds.run(target_cache, draft_cache)
        count += needed
        committed = int(rounds.committed)  # the one synchronisation per batch of rounds
    tokens = rounds.sequence[:, prompt_len:end].clone()
    stats = dict(drafted=k * count, accepted=int(rounds.accepted), target_forwards=1 + count)
    return tokens, stats


class _Rounds:
    """The device state of greedy speculative rounds on one pair of caches, and (on a GPU) the round as a graph.

    sequence[0, p] is the token at position p; `committed` counts the committed tokens (n). At the start of a round
    the target's cache holds positions 0 .. n - 2 and the draft's 0 .. n - 3 (anything past them is never read).
    """

    def __init__(self, target, draft, k: int, slots: int):
        self.target, self.draft, self.k = weakref.ref(target), draft, k  # weak: _ROUNDS is keyed by the target
        device = target.device
        self.sequence = torch.zeros(1, slots + 1, dtype=torch.long, device=device)
        self.committed = torch.zeros((), dtype=torch.long, device=device)
        self.accepted = torch.zeros((), dtype=torch.long, device=device)
        self.offsets = torch.arange(-2, k + 1, device=device)  # a round's positions, n - 2 .. n + k
        self.graph = None

    def start(self, input_ids: torch.Tensor, first: torch.Tensor) -> int:
        prompt_len = input_ids.shape[1]
        self.sequence[:, :prompt_len] = input_ids
        self.sequence[:, prompt_len : prompt_len + 1] = first
        self.committed.fill_(prompt_len + 1)
        self.accepted.zero_()
        return prompt_len + 1

    def run(self, target_cache, draft_cache) -> None:
        """One round. The caches are only read when the round runs eagerly (on the CPU, or the first time on a GPU,
        when it is recorded); a recorded graph holds their buffers, which the models' pools hand out again."""
        if self.graph is not None:
            self.graph.replay()
        elif self.sequence.is_cuda:
            self.graph = record_graph(lambda: self.round(target_cache, draft_cache))  # runs once, then recorded
        else:
            self.round(target_cache, draft_cache)

    def round(self, target_cache, draft_cache) -> None:
        """One round as device work only: draft k tokens, verify them, keep the agreeing prefix and the target's
        next token, advance the committed length. No host synchronisation, so it can be recorded as a graph."""
        k, draft, target = self.k, self.draft, self.target()
        positions = self.committed + self.offsets  # [k + 3]: n - 2 .. n + k
        newest = self.sequence.index_select(1, positions[:2])  # [1, 2]: the two newest committed tokens
        token = draft.forward_at(newest, positions[0], draft_cache)[:, -1:].argmax(-1)
        drafted = [token]
        for i in range(1, k):  # draft token i - 1 goes to position n + i - 1
            token = draft.forward_at(token, positions[i + 1], draft_cache)[:, -1:].argmax(-1)
            drafted.append(token)
        fed = torch.cat([newest[:, 1:], *drafted], dim=1)  # [1, k + 1]: the newest committed token, the drafts
        best = target.forward_at(fed, positions[1], target_cache).argmax(-1)  # [1, k + 1]
        accepted = (fed[:, 1:] == best[:, :k]).cumprod(dim=1).sum()
        # The kept drafts equal the target's argmaxes, so best[:, :accepted + 1] is exactly what this round commits;
        # the rest lands past the new length and is written over later. The caches roll back by the same move: the
        # new length alone says which slots count.
        self.sequence.index_copy_(1, positions[2:], best)
        self.accepted.add_(accepted)
        self.committed.add_(accepted + 1)


def _check_generate(target, draft, input_ids, max_new_tokens, k, temperature) -> None:
    if target.vocab_size != draft.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.vocab_size}) differs from the target's ({target.vocab_size})")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T] (one request), got {getattr(input_ids, 'shape', None)}")
    if input_ids.dtype != torch.int64 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one int64 token id, got {input_ids.dtype}")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= target.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {target.vocab_size})")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    needed = input_ids.shape[1] + max_new_tokens + k
    for name, model in (("target", target), ("draft", draft)):
        if needed > model.max_positions:
            raise ValueError(f"prompt + max_new_tokens + k = {needed} exceeds the {name}'s {model.max_positions} "
                             "positions")  # fmt: skip
