"""Exercise 04: speculative decoding.

Decoding one token with a small model at batch 1 costs about the same whether the forward pass scores 1 position or
5: the time goes to reading the weights and launching kernels, not to arithmetic. Speculative decoding spends that
slack. A cheap draft model proposes k tokens one at a time; the target model scores all k in one forward pass over
k + 1 positions; a verification rule keeps a prefix of the drafts and adds one token of the target's own. The rule is
built so that the tokens that come out are distributed exactly as if the target had decoded alone: a bad draft only
costs speed, never quality.

    Greedy (temperature 0): keep draft tokens while each equals the target's argmax at its position; at the first
    mismatch emit the target's argmax instead; if all k matched, emit the target's argmax at row k (a bonus).

    Sampling: keep draft token x (drawn from the draft's q) with probability min(1, p(x) / q(x)), p the target's
    distribution at that position. At the first rejection, draw a recovered token from normalize(max(0, p - q)). If
    all k are kept, draw a bonus token from the target's row k.

You build:
  1. `rejection_sample`: the sampling rule, batched over B requests.
  2. `greedy_verify`: the greedy rule.
  3. `speculative_generate`: the loop, with one KV cache per model, and the rollback of both caches.

The models (fixtures/speculative_models.py, `CachedModel`) come with a KV cache; you never write attention here:
    cache = model.new_cache(batch_size=1, capacity=C)       # empty: cache.seq_len == 0
    logits = model.forward(ids, cache)                      # ids [1, T] int64 take positions cache.seq_len ..
                                                            # seq_len + T - 1; logits [1, T, V] float32; seq_len += T
    cache.seq_len = n                                       # roll back to the first n tokens (n <= seq_len)
plus `model.vocab_size`, `model.device` and `model.max_positions`. Row t of the logits predicts the token *after*
input token t. Rolling back is your job: a cache that still holds a rejected draft token gives wrong logits from then
on.

Shapes: B requests, k drafted tokens per round, V vocabulary. Padding value: -1. Run `pytest exercises/04`.
"""

from __future__ import annotations

import torch

PAD = -1  # fills the rows of rejection_sample and greedy_verify past the last emitted token


def rejection_sample(
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Verify k drafted tokens per request against the target. Returns [B, k+1] int64.

    Draft tokens are counted from 0 here: draft token i is draft_token_ids[:, i], i = 0 .. k-1.
    draft_token_ids [B, k] int64 in [0, V) (V itself is out of range): the draft's tokens, each drawn from its row
        of draft_probs.
    draft_probs [B, k, V] float: row i is q, the draft's distribution that draft token i was drawn from.
    target_probs [B, k+1, V] float: row i is p, the target's distribution for the position that draft token i
        fills (the verify pass's output row i, computed from the tokens before draft token i); row k is the
        target's distribution for the position after the last draft token (the bonus row).
    generator: pass it to every random call (torch.rand, torch.multinomial), so that a seed fixes the result.

    Row b of the result: the draft tokens kept before the first rejection (a of them, 0 <= a <= k), then one more
    token (recovered from normalize(max(0, p - q)) of row a if a < k; the bonus, drawn from row k, if a == k), then
    -1 in the remaining k - a columns. Keep draft token x with probability min(1, p(x) / q(x)): draw u uniform in
    [0, 1) and keep when u < p(x) / q(x) (with p == q this keeps every token). If max(0, p - q) sums to 0 at a
    rejection (p <= q everywhere: possible only through rounding, since p and q each sum to 1 within 1e-3), draw
    the recovered token from p itself.

    Raise ValueError for: k < 1; draft_probs not [B, k, V] or target_probs not [B, k+1, V] (a batch size that
    differs from draft_token_ids', a mismatched k or vocabulary); token ids outside [0, V); rows of draft_probs or
    of target_probs with a negative entry (even if they sum to 1) or that do not sum to 1 (within 1e-3).
    """
    # TODO: validate; gather p(x_i) and q(x_i) for every draft token; draw u [B, k]; the number kept per row is the
    #  length of the run of u < p/q from the start (cumprod helps); build the distribution of the extra token (the
    #  residual at the first rejection, or row k); torch.multinomial draws it; fill the row and pad with -1.
    raise NotImplementedError("rejection_sample: keep x with probability min(1, p(x)/q(x)); recover from max(0, p-q)")


def greedy_verify(draft_token_ids: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Greedy verification of k drafted tokens per request. Returns [B, k+1] int64.

    draft_token_ids [B, k] int64 in [0, V); target_logits [B, k+1, V]: row i scores the position that draft token i
    (counted from 0) fills, row k the position after the last one.
    Row b of the result: the draft tokens up to the first one that differs from the argmax of its row (a of them,
    counted for each row on its own), then the target's argmax of row a (the correction, or the bonus when a == k),
    then -1. This is the rule for temperature 0 only: sampled drafts are verified by rejection_sample.
    Raise ValueError for k < 1, mismatched shapes (batch sizes that differ included), token ids outside [0, V).
    """
    # TODO: argmax of every row; count the leading matches; fill as in rejection_sample.
    raise NotImplementedError("greedy_verify: keep drafts while they equal the target's argmax, then the argmax")


def speculative_generate(
    target,
    draft,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    k: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Generate `max_new_tokens` tokens after the prompt input_ids [1, T] (one request) with speculative decoding.

    target, draft: CachedModel-like objects (module docstring) with the same vocabulary.
    temperature 0: greedy (choose argmax, verify with greedy_verify). temperature > 0: every distribution is
    softmax(logits / temperature), the temperature applied once (the prefill's, the draft's, the verify pass's); the
    draft samples its tokens, and verification is rejection_sample, with q the tempered rows the draft sampled from
    and p the verify pass's tempered rows (never greedy_verify); pass `generator` to every random call.

    No end-of-sequence rule: exactly max_new_tokens tokens come back, whatever they are. The course model's <eos>
    (257) is a token like any other here: the target's greedy tokens go on past it, and so must yours (a caller that
    stops at <eos> cuts the output after it).

    Returns (tokens, stats): tokens [1, max_new_tokens] int64, the new tokens only; stats a dict of ints:
        "drafted": draft tokens proposed (k per round), "accepted": drafted tokens kept by verification (count all
        of the last round's, even those past max_new_tokens), "target_forwards": target forward passes, prefill
        included.

    The loop:
        caches of capacity T + max_new_tokens + k for both models;
        prefill the target with the prompt: its last row gives the first new token (one target forward);
        while fewer than max_new_tokens tokens are out, one round:
            draft: feed the draft the committed tokens its cache lacks (all of them in the first round; after that
                the newest one, or the two newest after a round that kept all k), then its own drafts one at a
                time, k drafts in all;
            verify: one target forward over [newest committed token, k drafts]: k + 1 rows;
            keep what verification returns (a drafts + 1 token), and roll back both caches so each holds only
                committed tokens, never a rejected draft, and not the newest committed token (the next round
                feeds it).
        stop after the round that reaches max_new_tokens; return the first max_new_tokens tokens.
    With greedy decoding the tokens must be exactly those of the target decoding alone.

    Raise ValueError, with checks of your own (not an error the model happens to raise), for: vocabularies that
    differ; input_ids not [1, T] int64 (int32 is refused too) with ids in [0, V); k < 1; max_new_tokens < 1;
    temperature < 0; T + max_new_tokens + k beyond either model's max_positions (a model need not check it).
    """
    # TODO: follow the loop above. Keep a buffer with the prompt and every committed token; only the number of kept
    #  drafts needs to come back to Python each round (to set cache.seq_len).
    raise NotImplementedError("speculative_generate: draft k, verify k + 1 in one target pass, roll both caches back")
