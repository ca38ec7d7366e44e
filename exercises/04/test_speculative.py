"""Exercise 04 specification: speculative decoding, greedy and sampled, on the course model and its trained draft.

The verification rules are checked on small hand-made distributions (exact structure, and the emitted tokens'
distribution by chi-square tests); the loop runs on the course model (fixtures/course_model, a byte-level Llama
trained on Python's standard library) on the CPU in float32, against the target decoding alone. Speed is judged on
a GPU as the ratio of speculative to target-only decoding time, both through the same CUDA-graphed cached forward.
"""

import math

import pytest
import torch

from fixtures.checks import expect_error
from fixtures.course_model import EOS, encode, heldout_bytes, load_hf
from fixtures.speculative_models import CachedModel, ForwardOnly, greedy_decode

PAD = -1


@pytest.fixture
def spec(impl):
    return impl("speculative")


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Batch-1 decode steps of a 6M-parameter model are tiny: extra threads only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- rejection_sample: the emitted tokens follow the target's distribution ------------------------------------------

# Chi-square critical values at a false-failure probability of 1e-6, by degrees of freedom (scipy.stats.chi2.isf).
# A correct implementation fails one check with probability 1e-6 (the statistic is asymptotically chi-square: every
# expected cell count here is above 50). This file makes 11 such checks, so its false-failure rate is about 1e-5 per
# run for random seeds; with the fixed seeds below every run is the same run.
CHI2_CRITICAL = {1: 23.93, 2: 27.63, 3: 30.66, 4: 33.38, 5: 35.89, 6: 38.26, 7: 40.52}
SAMPLES = 60_000


def chi_square(tokens: torch.Tensor, expected: torch.Tensor) -> tuple[float, int, bool]:
    """(statistic, degrees of freedom, passes) of observed tokens against a distribution; any token with expected
    probability 0 fails outright."""
    counts = torch.bincount(tokens, minlength=len(expected)).double()
    expected = expected.double()
    if bool((counts[expected == 0] > 0).any()):
        return math.inf, 0, False
    support = expected > 0
    n = counts.sum()
    stat = float((((counts - n * expected) ** 2)[support] / (n * expected[support])).sum())
    df = int(support.sum()) - 1
    return stat, df, df == 0 or stat < CHI2_CRITICAL[df]


def verdict(stat: float, df: int) -> str:
    if stat == math.inf:
        return "tokens to which the target gives probability 0 came out"
    return (
        f"chi-square {stat:.1f} with {df} degrees of freedom; a correct sampler exceeds {CHI2_CRITICAL[df]} once in a "
        "million"
    )


def histogram(tokens: torch.Tensor, vocab: int) -> list[float]:
    return [round(x, 3) for x in (torch.bincount(tokens, minlength=vocab).double() / max(1, len(tokens))).tolist()]


def normalized(rows) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float64)
    return (t / t.sum(-1, keepdim=True)).float()


# Each scenario: target rows p [k+1, V] and draft rows q [k, V], k = 2, V = 6.
SCENARIOS = {
    "random p and q": (
        normalized([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8], [9, 7, 9, 3, 2, 3]]),
        normalized([[8, 4, 6, 2, 6, 4], [3, 3, 8, 3, 2, 7]]),
    ),
    "q > p on the drafted tokens": (  # the draft over-proposes tokens 2 and 3, one of which the target never makes
        normalized([[5, 3, 2, 0, 0, 0], [1, 1, 4, 4, 0, 0], [0, 0, 1, 1, 4, 4]]),
        normalized([[1, 2, 5, 2, 0, 0], [4, 4, 1, 1, 0, 0]]),
    ),
    "disjoint supports": (  # nothing the draft proposes can be kept
        normalized([[5, 3, 2, 0, 0, 0], [2, 3, 5, 0, 0, 0], [1, 1, 1, 0, 0, 0]]),
        normalized([[0, 0, 0, 2, 3, 5], [0, 0, 0, 5, 3, 2]]),
    ),
    "draft equals target": (
        normalized([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8], [9, 7, 9, 3, 2, 3]]),
        normalized([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]]),
    ),
}


def first_token_under_mistakes(p: torch.Tensor, q: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The distribution of the first emitted token under common mistakes, worked out exactly (p, q: rows 0 and 1)."""
    p0, p1, q0 = p[0].double(), p[1].double(), q[0].double()

    def emitted(keep: torch.Tensor, recover: torch.Tensor) -> torch.Tensor:
        """keep[x]: P(draft x and keep it); the rest of the mass goes to a token drawn from `recover`."""
        recover = recover / recover.sum() if recover.sum() > 0 else p0
        return keep + (1 - keep.sum()) * recover

    residual = (p0 - q0).clamp(min=0)
    kept_exactly = torch.minimum(p0, q0)  # P(draft x and keep it) under the right rule
    inverted = q0 * torch.where(p0 > 0, q0 / p0.clamp(min=1e-300), torch.ones_like(q0)).clamp(max=1)
    second_kept = float(torch.minimum(p[2 - 1].double(), q[1].double()).sum())  # P(draft 1 kept), on its own
    wrong_row = "draft token i checked against target row i + 1 (row i is the distribution at draft token i's position)"
    return [
        ("the recovered token is drawn from p instead of normalize(max(0, p - q))", emitted(torch.minimum(p0, q0), p0)),
        (
            "a draft token is kept whenever p(x) > q(x), with no random draw (keep it with probability min(1, p/q))",
            emitted(torch.where(p0 > q0, q0, 0), residual),
        ),
        (wrong_row, emitted(torch.minimum(p1, q0), residual)),  # row i + 1 for keeping only
        (wrong_row, emitted(torch.minimum(p1, q0), (p1 - q0).clamp(min=0))),  # for keeping and recovering
        ("every draft token is kept (no verification)", q0),
        (
            "the acceptance ratio is inverted: a draft token kept with probability min(1, q/p) instead of min(1, p/q)",
            emitted(inverted, residual),
        ),
        (  # draft 0 comes out when it is kept, or when it is rejected but draft 1 is kept
            "drafts kept past the first rejection: the kept prefix must end at the first rejected draft (a cumulative "
            "product over the keep decisions)",
            emitted(kept_exactly + (q0 - kept_exactly) * second_kept, residual),
        ),
    ]


def name_the_mistake(tokens, candidates) -> str:
    fits = {name for name, dist in candidates if chi_square(tokens, dist.float())[2]}
    return f" This looks like: {fits.pop()}." if len(fits) == 1 else ""


def draw(p, q, samples=SAMPLES, seed=0):
    """Draft tokens drawn from q for `samples` requests, and the expanded [B, k, V], [B, k+1, V] probabilities."""
    generator = torch.Generator().manual_seed(seed)
    k, vocab = q.shape
    ids = torch.stack([torch.multinomial(q[i], samples, replacement=True, generator=generator) for i in range(k)], 1)
    return ids, q.expand(samples, k, vocab).contiguous(), p.expand(samples, k + 1, vocab).contiguous()


def run_rejection(spec, scenario, seed=1):
    p, q = SCENARIOS[scenario]
    ids, draft_probs, target_probs = draw(p, q)
    out = spec.rejection_sample(ids, draft_probs, target_probs, generator=torch.Generator().manual_seed(seed))
    assert isinstance(out, torch.Tensor) and out.shape == (SAMPLES, 3) and out.dtype == torch.int64, (
        f"rejection_sample must return [B={SAMPLES}, k+1=3] int64, got "
        f"{getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}"
    )
    return p, q, ids, out


def check_structure(ids, out, vocab):
    """Each row: kept draft tokens, one token in [0, V), then -1."""
    k = ids.shape[1]
    emitted = (out != PAD).sum(1)
    column = torch.arange(k + 1)[None]
    assert bool((emitted >= 1).all()), "every row must emit at least one token (the recovered or bonus token)"
    assert torch.equal(out != PAD, column < emitted[:, None]), (
        "each row must be its emitted tokens first, then -1 padding: found a -1 before a token, e.g. row "
        f"{out[((out != PAD) != (column < emitted[:, None])).any(1)][0].tolist()}"
    )
    last = out.gather(1, (emitted - 1)[:, None]).squeeze(1)
    assert bool(((last >= 0) & (last < vocab)).all()), f"emitted tokens must lie in [0, {vocab})"
    kept = column[:, :k] < (emitted - 1)[:, None]
    bad = (kept & (out[:, :k] != ids)).any(1)
    if bool(bad.any()):
        # Rows that read right when 0 is taken for padding: the kept drafts, one token, then only zeros.
        zero_padded = all(
            set(row[next(i for i in range(k) if row[i] != draft[i]) + 1 :]) <= {0}
            for row, draft in zip(out[bad].tolist(), ids[bad].tolist(), strict=True)
        )
        pytest.fail(
            "the tokens before a row's last emitted token must be the draft tokens it kept, in order: a row has "
            f"draft {ids[bad][0].tolist()} and output {out[bad][0].tolist()}"
            + (". This looks like: rows padded with 0 instead of -1 (0 is a token id)" if zero_padded else ""),
            pytrace=False,
        )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rows_are_kept_drafts_then_one_token_then_padding(spec, scenario):
    p, q, ids, out = run_rejection(spec, scenario)
    check_structure(ids, out, p.shape[1])


@pytest.mark.points(2)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_first_emitted_token_follows_the_target(spec, scenario):
    p, q, ids, out = run_rejection(spec, scenario)
    stat, df, passes = chi_square(out[:, 0].clamp(min=0), p[0])
    assert passes, (
        f"{scenario}: over {SAMPLES} requests the first emitted token must be distributed as the target's row 0 "
        f"{histogram_of(p[0])}, got {histogram(out[:, 0].clamp(min=0), p.shape[1])} ({verdict(stat, df)})."
        + name_the_mistake(out[:, 0].clamp(min=0), first_token_under_mistakes(p, q))
    )


def histogram_of(dist):
    return [round(x, 3) for x in dist.tolist()]


@pytest.mark.parametrize("scenario", ["random p and q", "q > p on the drafted tokens"])
def test_next_token_follows_the_target_after_a_kept_draft(spec, scenario):
    p, q, ids, out = run_rejection(spec, scenario)
    kept = out[:, 0] == ids[:, 0]
    following = out[kept, 1]
    stat, df, passes = chi_square(following.clamp(min=0), p[1])
    assert bool((following != PAD).all()), "after a kept draft token, the row must go on with a token, not -1"
    assert passes, (
        f"{scenario}: after draft token 0 was kept ({int(kept.sum())} requests), the second emitted token must be "
        f"distributed as the target's row 1 {histogram_of(p[1])}, got {histogram(following, p.shape[1])} "
        f"({verdict(stat, df)})"
    )


def check_bonus(bonus: torch.Tensor, p: torch.Tensor, q: torch.Tensor, where: str) -> None:
    """The bonus tokens of rows that kept all k = 2 drafts: present, and distributed as the target's row k."""
    assert bool((bonus != PAD).all()), (
        "no bonus token: when all k drafts are kept, the target's row k still gives one more token (column k), "
        f"got -1 in {int((bonus == PAD).sum())} rows"
    )
    stat, df, passes = chi_square(bonus, p[2])
    mistake = name_the_mistake(bonus, [  # where q == p the two look the same, and neither is named
        ("the bonus token is drawn from the target's row k - 1 instead of row k", p[1]),
        ("the bonus token is drawn from the draft's row k - 1 (q) instead of the target's row k", q[1]),
    ])  # fmt: skip
    assert passes, (
        f"{where}: the bonus token must be distributed as the target's row k {histogram_of(p[2])}, got "
        f"{histogram(bonus, p.shape[1])} ({verdict(stat, df)}).{mistake}"
    )


def test_the_bonus_token_follows_the_targets_row_k(spec):
    p, q, ids, out = run_rejection(spec, "random p and q")
    all_kept = (out[:, :2] == ids).all(1)
    check_bonus(out[all_kept, 2], p, q, f"random p and q, the {int(all_kept.sum())} rows that kept both drafts")


@pytest.mark.points(2)
def test_draft_equal_to_target_keeps_every_draft_then_adds_a_bonus_token(spec):
    p, q, ids, out = run_rejection(spec, "draft equals target")
    assert torch.equal(out[:, :2], ids), (
        "with q == p every draft token must be kept (p(x)/q(x) = 1, and u < 1 always): "
        f"{int((out[:, :2] != ids).any(1).sum())} of {SAMPLES} rows rejected one"
    )
    check_bonus(out[:, 2], p, q, "draft equals target")


def test_disjoint_supports_keep_nothing(spec):
    p, q, ids, out = run_rejection(spec, "disjoint supports")
    assert bool((out[:, 1:] == PAD).all()) and bool((out[:, 0] != ids[:, 0]).all()), (
        "the target gives probability 0 to every token the draft proposes, so no draft token may be kept: each row "
        f"must be [recovered, -1, -1]; first rows: {out[:3].tolist()} for drafts {ids[:3].tolist()}"
    )


def test_an_empty_residual_falls_back_to_p(spec):
    """p gives 0 to the drafted token and equals q everywhere else, so p sums to 0.9991 (within the tolerance) and
    max(0, p - q) is all zeros: every draft is rejected, and the recovered token is drawn from p itself."""
    samples, vocab = 20_000, 6
    q0 = [0.3, 0.2, 0.2, 0.2, 0.0991, 0.0009]
    p0 = [0.3, 0.2, 0.2, 0.2, 0.0991, 0.0]
    ids = torch.full((samples, 1), 5)
    draft_probs = torch.tensor([q0]).expand(samples, 1, vocab).contiguous()
    target_probs = torch.tensor([p0, [1 / vocab] * vocab]).expand(samples, 2, vocab).contiguous()
    rule = "when max(0, p - q) sums to 0, draw the recovered token from p itself"
    try:
        out = spec.rejection_sample(ids, draft_probs, target_probs, generator=torch.Generator().manual_seed(4))
    except Exception as error:  # noqa: BLE001  (what the student's code raised is the finding)
        pytest.fail(f"rejection_sample raised {type(error).__name__}: {error}: {rule}", pytrace=False)
    assert bool((out[:, 1] == PAD).all()), f"p(5) = 0: draft token 5 can never be kept, got rows {out[:3].tolist()}"
    expected = torch.tensor(p0) / sum(p0)
    stat, df, passes = chi_square(out[:, 0].clamp(min=0), expected)
    assert passes, (
        f"the recovered tokens must be distributed as p {histogram_of(expected)}, got "
        f"{histogram(out[:, 0].clamp(min=0), vocab)} ({verdict(stat, df)}): {rule}"
    )


def test_a_seeded_generator_fixes_the_result(spec):
    p, q = SCENARIOS["random p and q"]
    ids, draft_probs, target_probs = draw(p, q, samples=2000)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # must not matter: every random draw goes through `generator`
        generator = torch.Generator().manual_seed(7)
        results.append(spec.rejection_sample(ids, draft_probs, target_probs, generator=generator))
    assert torch.equal(*results), (
        "the same generator seed gave different results: pass `generator` to every random call (torch.rand, "
        "torch.multinomial) instead of drawing from the global generator"
    )


def with_negative_entry(probs: torch.Tensor) -> torch.Tensor:
    """The same rows with request 0's row 0 replaced by [1.5, -0.5, 0, ...]: it still sums to 1."""
    bad = probs.clone()
    bad[0, 0] = 0
    bad[0, 0, :2] = torch.tensor([1.5, -0.5])
    return bad


def bad_rejection_inputs():
    p, q = SCENARIOS["random p and q"]
    ids, dp, tp = draw(p, q, samples=4)
    vocab = p.shape[1]
    at_vocab = ids.clone()
    at_vocab[0, 0] = vocab  # one id exactly V: the first one out of range
    return {
        "draft_probs with another k": (ids, dp[:, :1], tp),
        "target_probs with k rows instead of k+1": (ids, dp, tp[:, :2]),
        "vocabularies that differ": (ids, dp, torch.cat([tp, torch.zeros(4, 3, 1)], -1)),
        "draft ids for 3 requests, probabilities for 4": (ids[:3], dp, tp),
        "draft_probs that do not sum to 1": (ids, dp * 0.5, tp),
        "target_probs that do not sum to 1": (ids, dp, tp * 0.5),
        "draft logits instead of probabilities": (ids, dp.log(), tp),
        "target logits instead of probabilities": (ids, dp, tp.log()),
        "a draft row with a negative entry that still sums to 1": (ids, with_negative_entry(dp), tp),
        "a target row with a negative entry that still sums to 1": (ids, dp, with_negative_entry(tp)),
        "negative token ids": (ids - 10, dp, tp),
        "a token id equal to V (ids must be < V)": (at_vocab, dp, tp),
        "token ids past the vocabulary": (ids + 6, dp, tp),
        "k < 1": (ids[:, :0], dp[:, :0], tp[:, :1]),
    }


@pytest.mark.parametrize("mistake", list(bad_rejection_inputs()))
def test_rejection_sample_rejects_bad_input(spec, mistake):
    args = bad_rejection_inputs()[mistake]
    expect_error(ValueError, lambda: spec.rejection_sample(*args, generator=torch.Generator().manual_seed(0)),
                 f"rejection_sample with {mistake}")  # fmt: skip


# --- greedy_verify ----------------------------------------------------------------------------------------------


def logits_with_argmax(best: list[list[int]], vocab: int = 6) -> torch.Tensor:
    """[B, k+1, V] logits whose row i argmax is best[b][i], with random values elsewhere (below it)."""
    generator = torch.Generator().manual_seed(3)
    best_t = torch.tensor(best)
    logits = torch.rand(*best_t.shape, vocab, generator=generator)
    return logits.scatter(-1, best_t[..., None], 2.0)


def greedy_reference(draft, best, mistake=None) -> list[list[int]]:
    """The right rows, or the rows a common mistake gives (for naming it)."""
    rows = []
    for d, b in zip(draft, best, strict=True):
        k, out = len(d), []
        compare = b[1:] if mistake == "row" else b
        i = 0
        while i < k and i < len(compare) and d[i] == compare[i]:
            out.append(d[i])
            i += 1
        if mistake == "count":  # every match counted, wherever it is: the first that many drafts come out
            i = sum(x == y for x, y in zip(d, b[:k], strict=True))
            out = list(d[:i])
        if mistake == "min":  # one count for the whole batch: the smallest
            matched = [next((j for j in range(k) if dd[j] != bb[j]), k) for dd, bb in zip(draft, best, strict=True)]
            i = min(matched)
            out = list(d[:i])
        if mistake == "row" and i == k:
            out.append(b[k])
        elif mistake == "no bonus" and i == k:
            pass
        elif mistake == "draft at mismatch":
            out.append(d[i] if i < k else b[k])
        else:
            out.append(b[i])
        rows.append(out + [0 if mistake == "pad 0" else PAD] * (k + 1 - len(out)))
    return rows


GREEDY_MISTAKES = {
    "row": "draft token i compared with the argmax of target row i + 1 instead of row i",
    "no bonus": "no bonus token when all k drafts match (row k's argmax must follow them)",
    "draft at mismatch": "the draft's token emitted at the first mismatch instead of the target's argmax",
    "count": "drafts kept past the first mismatch: every match was counted, but the kept prefix must stop at the first "
    "mismatch (a cumulative product)",
    "pad 0": "rows padded with 0 instead of -1 (0 is a token id)",
    "min": "one kept count for the whole batch (the smallest): each row keeps its own number of drafts",
}


def check_greedy(spec, draft, best):
    got = spec.greedy_verify(torch.tensor(draft), logits_with_argmax(best))
    expected = greedy_reference(draft, best)
    shape = (len(draft), len(best[0]))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64 and tuple(got.shape) == shape, (
        f"greedy_verify must return [B, k+1] int64, got {getattr(got, 'shape', type(got).__name__)}"
    )
    named = {text for key, text in GREEDY_MISTAKES.items() if got.tolist() == greedy_reference(draft, best, key)}
    assert got.tolist() == expected, (
        f"drafts {draft} against target argmaxes {best}: expected {expected}, got {got.tolist()}."
        + (f" This looks like: {named.pop()}." if len(named) == 1 else "")  # named only when one mistake fits
    )


def test_greedy_counts_each_rows_kept_drafts_on_its_own(spec):
    check_greedy(spec, [[1, 2, 3], [1, 2, 0], [1, 0, 0]], [[1, 2, 3, 4]] * 3)


def test_greedy_keeps_matching_drafts_then_the_targets_token(spec):
    best = [[1, 2, 3, 4]] * 4
    check_greedy(spec, [[1, 2, 3], [1, 0, 3], [0, 2, 3], [1, 2, 0]], best)


def test_greedy_compares_draft_i_with_target_row_i(spec):
    # Each draft equals the argmax of the *next* row: only a comparison against the wrong row keeps them.
    check_greedy(spec, [[2, 3, 4], [2, 3, 0]], [[1, 2, 3, 4], [1, 2, 3, 4]])


def test_greedy_adds_the_bonus_token_when_all_drafts_match(spec):
    check_greedy(spec, [[5, 0], [3, 3]], [[5, 0, 2], [3, 3, 1]])


GREEDY_BAD_INPUT = [
    "logits with k rows instead of k+1",
    "vocabulary smaller than a token id",
    "a token id equal to V (ids must be < V)",
    "negative token ids",
    "k < 1",
    "draft ids for 2 requests, logits for 1",
]


@pytest.mark.parametrize("mistake", GREEDY_BAD_INPUT)
def test_greedy_verify_rejects_bad_input(spec, mistake):
    ids, logits = torch.tensor([[1, 2, 3]]), logits_with_argmax([[1, 2, 3, 4]])
    bad = {
        "logits with k rows instead of k+1": (ids, logits[:, :3]),
        "vocabulary smaller than a token id": (ids + 4, logits),
        "a token id equal to V (ids must be < V)": (torch.tensor([[1, 6, 3]]), logits),
        "negative token ids": (ids - 2, logits),
        "k < 1": (ids[:, :0], logits[:, :1]),
        "draft ids for 2 requests, logits for 1": (ids.repeat(2, 1), logits),
    }[mistake]
    expect_error(ValueError, lambda: spec.greedy_verify(*bad), f"greedy_verify with {mistake}")


# --- speculative_generate on the course model (CPU, fp32) ----------------------------------------------------------


@pytest.fixture(scope="module")
def hf_target():
    return load_hf("target")


@pytest.fixture(scope="module")
def target(hf_target):
    return CachedModel(hf_target)


@pytest.fixture(scope="module")
def drafts(hf_target):
    return {
        "draft = target": CachedModel(hf_target),  # the same weights: every draft is kept
        "trained draft": CachedModel(load_hf("draft")),
        "adversarial draft": Contrary(CachedModel(hf_target)),  # proposes the target's least likely token
    }


class Contrary(ForwardOnly):
    """A draft whose logits are the target's, negated: its greedy choice is never the target's."""

    def forward(self, input_ids, cache):
        return -self.model.forward(input_ids, cache)


class Recorder(ForwardOnly):
    """Wraps a model and records every forward in a log shared by both models: (who, cache, seq_len before, fed)."""

    def __init__(self, model, who: str, log: list, needed: int):
        super().__init__(model)
        self.who, self.log, self.needed = who, log, needed
        self.capacities = {}

    @property
    def calls(self):
        return [entry for entry in self.log if entry[0] == self.who]

    def new_cache(self, batch_size, capacity):
        cache = self.model.new_cache(batch_size, capacity)
        self.capacities[id(cache)] = capacity
        return cache

    def forward(self, input_ids, cache):
        self.log.append((self.who, id(cache), cache.seq_len, input_ids[0].tolist()))
        try:
            return self.model.forward(input_ids, cache)
        except ValueError as error:
            full = "capacity" in str(error) and self.capacities.get(id(cache), 0) >= self.needed
            if not full:
                raise
            problem = str(error)
        pytest.fail(
            f"cache not rolled back: the {self.who}'s cache filled up ({problem}), though prompt + max_new_tokens + "
            f"k = {self.needed} tokens is all it ever needs to hold: rejected drafts piled up in it. Set "
            "cache.seq_len back after each verification",
            pytrace=False,
        )


def spies(target, draft, needed: int):
    log = []
    return Recorder(target, "target", log, needed), Recorder(draft, "draft", log, needed)


def rollback_violation(log: list, sequence: list[int]) -> str | None:
    """Replays what each cache held. Before every target pass, and before the draft's first step of each round (its
    first forward after a target pass), a cache must hold only a prefix of the final sequence: committed tokens."""
    held: dict[int, list[int]] = {}
    previous = None
    for number, (who, cache, seq_len, fed) in enumerate(log):
        tokens = held.setdefault(cache, [])
        if seq_len > len(tokens):
            return f"the {who}'s cache claimed {seq_len} tokens before forward {number} but was fed only {len(tokens)}"
        cached = tokens[:seq_len]
        round_start = who == "target" or previous == "target"
        prefix = sequence[: len(cached)]
        if round_start and cached != prefix:
            at = next(i for i, (a, b) in enumerate(zip(cached, prefix, strict=True)) if a != b)
            step = "verification" if who == "target" else "first draft step of a round"
            return (
                f"cache not rolled back: at forward {number} ({step}), "
                f"the {who}'s cache held token {cached[at]} at position {at}, where the output has {prefix[at]}: a "
                "rejected draft token stayed in the cache, so every later logit of that model attends to it. Set "
                "cache.seq_len back after each verification"
            )
        if round_start:
            # The first token fed (the newest committed one; for the draft, every token it is fed) must go right
            # after what the cache holds: at position seq_len, where the output has it.
            committed = fed[:1] if who == "target" else fed
            for offset, token in enumerate(committed):
                at = seq_len + offset
                if at < len(sequence) and token != sequence[at]:
                    return (
                        f"at forward {number}, the {who} was fed token {token} at position {at}, where the output has "
                        f"{sequence[at]}: its cache holds {seq_len} tokens, one token short of the committed ones it "
                        "should hold. The cache was rolled back too far, or a committed token was never fed to it "
                        "(after a round that keeps all k drafts, the draft has not seen the last of them)"
                    )
        held[cache] = cached + fed
        previous = who
    return None


PROMPT_OFFSETS = (0, 4096, 20000)


def prompt(index=0, length=24) -> torch.Tensor:
    start = PROMPT_OFFSETS[index]
    return encode(heldout_bytes()[start : start + length])


_greedy_cache: dict = {}


def target_greedy(hf_target, ids, new) -> list[int]:
    """The target decoding alone, with a full transformers forward per token: slow, obviously right."""
    key = (tuple(ids[0].tolist()), new)
    if key not in _greedy_cache:
        seq = ids
        with torch.no_grad():
            for _ in range(new):
                seq = torch.cat([seq, hf_target(seq).logits[:, -1:].argmax(-1)], dim=1)
        _greedy_cache[key] = seq[0, ids.shape[1] :].tolist()
    return _greedy_cache[key]


DRAFT_KEPT = (
    "the token there is the one the draft proposed, and the target's argmax differs: a draft token was kept or emitted "
    "where it does not match the target's argmax at its position (draft token i is checked against verify row i, and "
    "at the first mismatch the target's own token comes out)"
)


def drafted_there(spy_target, position: int, sequence: list[int]) -> str | None:
    """Why the output went wrong at `position`, if the token there is the draft's proposal for it."""
    for _, _, seq_len, fed in spy_target.calls[1:]:
        if seq_len < position <= seq_len + len(fed) - 1 and fed[position - seq_len] == sequence[position]:
            return DRAFT_KEPT
    return None


def stats_comparing_the_next_row(greedy: list[int], k: int, new: int) -> tuple[int, int] | None:
    """(accepted, target forwards) of a loop whose draft is the target but compares draft token i with target row
    i + 1: its drafts are the target's own greedy tokens, so a round keeps them while each equals the next one."""
    committed, accepted, forwards = 1, 0, 1
    while committed < new:
        if committed + k >= len(greedy):
            return None
        kept = 0
        while kept < k and greedy[committed + kept] == greedy[committed + kept + 1]:
            kept += 1
        committed, accepted, forwards = committed + kept + 1, accepted + kept, forwards + 1
    return accepted, forwards


def check_stats(stats, k, new, which, spy_forwards, greedy=None):
    assert isinstance(stats, dict) and {"drafted", "accepted", "target_forwards"} <= set(stats), (
        f"stats must be a dict with drafted, accepted and target_forwards, got {stats!r}"
    )
    drafted, accepted, forwards = (int(stats[key]) for key in ("drafted", "accepted", "target_forwards"))
    rounds = forwards - 1
    assert forwards == spy_forwards, (
        f"stats say {forwards} target forward passes, the target saw {spy_forwards} (count the prefill too)"
    )
    assert drafted == k * rounds, f"{rounds} rounds of k = {k} drafts: drafted must be {k * rounds}, got {drafted}"
    if which == "draft = target":
        next_row = greedy is not None and stats_comparing_the_next_row(greedy, k, new) == (accepted, forwards)
        assert accepted == drafted, (
            f"the draft is the target, so every draft is kept: accepted must be {drafted}, got {accepted}"
            + (" (off by one per round: off-by-one in the accepted count)" if abs(accepted - drafted) == rounds else "")
            + (
                " (exactly what comparing draft token i with target row i + 1 gives: verify row i scores draft i)"
                if next_row and accepted != drafted
                else ""
            )
        )
        assert forwards == 1 + math.ceil((new - 1) / (k + 1)), (
            f"with every draft kept, each round emits k + 1 = {k + 1} tokens: {new} tokens take "
            f"1 + ceil({new - 1}/{k + 1}) = {1 + math.ceil((new - 1) / (k + 1))} target passes, got {forwards}"
        )
    if which == "adversarial draft":
        assert accepted == 0, f"no draft of the adversarial draft can be kept: accepted must be 0, got {accepted}" + (
            " (one per round: off-by-one in the accepted count)"
            if accepted == rounds
            else (" (accepted equals drafted: count only the drafts the target kept)" if accepted == drafted else "")
        )
        assert forwards == new, f"keeping nothing, each pass emits one token: {new} passes, got {forwards}"
    assert new <= 1 + accepted + rounds <= new + k, (
        f"each round emits its kept drafts plus one token, and the prefill one more: 1 + accepted + rounds = "
        f"{1 + accepted + rounds} must lie in [{new}, {new + k}] for {new} tokens (accepted {accepted}, rounds "
        f"{rounds}): off-by-one in the accepted count?"
    )


NEW_TOKENS = 32


@pytest.mark.points(2)
@pytest.mark.parametrize("which", ["draft = target", "trained draft", "adversarial draft"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_speculative_decoding_returns_the_targets_own_tokens(spec, target, drafts, hf_target, k, which):
    ids = prompt(0)
    spy_target, spy_draft = spies(target, drafts[which], ids.shape[1] + NEW_TOKENS + k)
    longer = target_greedy(hf_target, ids, NEW_TOKENS + 9)  # past the end: the drafts of the last round (k <= 8)
    expected = longer[:NEW_TOKENS]
    try:
        result = spec.speculative_generate(spy_target, spy_draft, ids, NEW_TOKENS, k)
    except Exception as error:
        # The output must be the target's own greedy tokens: replay what each cache held against them.
        why = rollback_violation(spy_target.log, ids[0].tolist() + expected)
        if why is None:
            raise
        pytest.fail(f"k = {k}, {which}: speculative_generate raised {error!r}. Replayed against the target's own "
                    f"greedy tokens: {why}.", pytrace=False)  # fmt: skip
    assert isinstance(result, tuple) and len(result) == 2, "speculative_generate must return (tokens, stats)"
    tokens, stats = result
    assert isinstance(tokens, torch.Tensor) and tokens.shape == (1, NEW_TOKENS) and tokens.dtype == torch.int64, (
        f"tokens must be [1, {NEW_TOKENS}] int64, got {getattr(tokens, 'shape', type(tokens).__name__)}"
    )
    got = tokens[0].tolist()
    sequence = ids[0].tolist() + got
    why = rollback_violation(spy_target.log, sequence)
    if got != expected:
        first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
        why = why or drafted_there(spy_target, ids.shape[1] + first, sequence)
        pytest.fail(
            f"k = {k}, {which}: greedy speculative decoding must give exactly the target's own greedy tokens; they "
            f"differ from token {first} on: expected {expected[first : first + 8]}, got {got[first : first + 8]}."
            + (f" {why}." if why else ""),
            pytrace=False,
        )
    assert why is None, f"k = {k}, {which}: the tokens are right, but {why}"
    check_stats(stats, k, NEW_TOKENS, which, len(spy_target.calls), longer)


def test_both_caches_hold_only_committed_tokens(spec, target, drafts):
    """Before every forward, each cache must hold a prefix of the final sequence: no rejected draft stays."""
    ids = prompt(1)
    spy_target, spy_draft = spies(target, drafts["trained draft"], ids.shape[1] + 48 + 4)
    tokens, _ = spec.speculative_generate(spy_target, spy_draft, ids, 48, 4)
    problem = rollback_violation(spy_target.log, ids[0].tolist() + tokens[0].tolist())
    assert problem is None, problem
    verify_sizes = {len(fed) for _, _, _, fed in spy_target.calls[1:]}
    assert verify_sizes == {5}, (
        f"each verification is one target forward over the newest committed token and the k = 4 drafts (5 tokens); "
        f"the target was fed {sorted(verify_sizes)} tokens per pass after the prefill"
    )


def test_trained_draft_cuts_target_passes_per_token(spec, target, drafts):
    """The algorithmic speedup: target forward passes per generated token, with the acceptance rate, over four
    prompts spread evenly over the held-out text (acceptance varies a lot from one text to the next)."""
    totals = dict(drafted=0, accepted=0, target_forwards=0)
    new, text = 96, heldout_bytes()
    starts = torch.linspace(0, len(text) - 25, 4).long().tolist()
    for start in starts:
        _, stats = spec.speculative_generate(target, drafts["trained draft"], encode(text[start : start + 24]), new, 4)
        for key in totals:
            totals[key] += int(stats[key])
    per_token = totals["target_forwards"] / (len(starts) * new)
    acceptance = totals["accepted"] / max(1, totals["drafted"])
    # The reference: 0.31 passes per token, 0.58 of drafts kept (the pair agrees on 0.81 of greedy tokens, and a
    # round stops at its first rejection). Decoding with the target alone takes 1 pass per token.
    assert per_token <= 0.4 and acceptance >= 0.5, (
        f"k = 4 with the trained draft: {per_token:.2f} target passes per token with {acceptance:.2f} of the drafts "
        "kept; expected at most 0.4 passes per token and at least 0.5 kept"
    )


def test_greedy_with_the_models_as_handed_over(spec, target, drafts, hf_target):
    """The same contract with the cached models themselves, no wrapper around them: the target's own greedy tokens,
    and statistics that fit them (k drafts a round; each round emits its kept drafts and one token)."""
    ids, new, k = prompt(1), 40, 4
    expected = target_greedy(hf_target, ids, new + 9)[:new]
    tokens, stats = spec.speculative_generate(target, drafts["trained draft"], ids, new, k)
    got = tokens[0].tolist()
    if got != expected:
        first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
        # With the right tokens before it, the draft proposes its greedy choice there (whichever step of a round).
        draft = drafts["trained draft"]
        context = torch.cat([ids, torch.tensor([expected[:first]], dtype=torch.long)], dim=1)
        proposed = int(draft.forward(context, draft.new_cache(1, context.shape[1]))[0, -1].argmax())
        # The same call through wrappers that show only new_cache and forward: right tokens there put the mistake in
        # a path that uses forward_at (rounds recorded on the device), as the reference has.
        wrapped = spec.speculative_generate(ForwardOnly(target), ForwardOnly(draft), ids, new, k)[0][0].tolist()
        pytest.fail(
            f"k = {k}, the trained draft, the models unwrapped: greedy speculative decoding must give exactly the "
            f"target's own greedy tokens; they differ from token {first} on: expected {expected[first : first + 8]}, "
            f"got {got[first : first + 8]}."
            + (f" {DRAFT_KEPT}." if got[first] == proposed else "")
            + (" With both models wrapped so that only new_cache and forward are visible the tokens are right, so the "
               "mistake is in the path that uses forward_at (rounds on the device): there too, draft i is compared "
               "with the target's row i, counting stops at the first mismatch, the verify pass starts at the "
               "committed length, and the target's token is committed where they differ." if wrapped == expected
               else ""),
            pytrace=False,
        )
    check_stats(stats, k, new, "trained draft", int(stats["target_forwards"]))


END_OF_FILE_PROMPT = "if __name__ == '__main__':\n    main()\n"  # the target's next token is <eos>


def test_greedy_goes_on_past_end_of_sequence(spec, target, drafts, hf_target):
    """No end-of-sequence rule: <eos> (257) is a token like any other here; the output is the target's own greedy
    tokens, exactly max_new_tokens of them, past <eos> too (a caller that stops at <eos> cuts the output itself)."""
    ids, new = encode(END_OF_FILE_PROMPT), 12
    expected = target_greedy(hf_target, ids, new)
    assert expected[0] == EOS, f"the course model's first token after this prompt is <eos>, got {expected[0]}"
    tokens, _ = spec.speculative_generate(target, drafts["trained draft"], ids, new, 4)
    got = tokens[0].tolist()
    stopped = got[0] == EOS and len(set(got[1:])) == 1
    assert got == expected, (
        f"after a prompt that ends a file, greedy speculative decoding must give the target's own {new} tokens: "
        f"expected {expected}, got {got}"
        + (": generation does not stop at <eos>; it returns max_new_tokens tokens, whatever they are" if stopped
           else "")
    )  # fmt: skip


def test_sampling_with_draft_equal_to_target_keeps_every_draft(spec, target, drafts):
    ids = prompt(2)
    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(11)
        runs.append(spec.speculative_generate(target, drafts["draft = target"], ids, 24, 3, 1.0, generator))
    (tokens, stats), (again, _) = runs
    assert tokens.shape == (1, 24) and bool(((tokens >= 0) & (tokens < target.vocab_size)).all()), (
        f"sampled tokens must be [1, 24] ids in [0, {target.vocab_size}), got {tokens.tolist()}"
    )
    assert torch.equal(tokens, again), "two runs with the same generator seed differ: pass `generator` to every draw"
    if int(stats["accepted"]) >= int(stats["drafted"]) - 1:
        return
    sequence = torch.cat([ids, tokens], dim=1)
    best = target.forward(sequence, target.new_cache(1, sequence.shape[1]))[0, ids.shape[1] - 1 : -1].argmax(-1)
    only_argmax = torch.equal(best, tokens[0])  # a sampled run of 24 tokens that are all argmaxes: not by chance
    pytest.fail(
        "at temperature 1 with the draft equal to the target, p == q up to rounding, so (nearly) every draft is kept: "
        f"accepted {stats['accepted']} of {stats['drafted']}. "
        + ("Every token that came out is the target's argmax: sampled drafts were verified by greedy_verify's rule; "
           "at temperature > 0 verification is rejection_sample's (keep x with probability min(1, p(x)/q(x)))"
           if only_argmax else
           "Are the draft's probabilities q the ones its tokens were sampled from, and p = softmax(target logits / "
           "temperature) on the same rows?"),
        pytrace=False,
    )


class Bigram:
    """A toy model whose next-token distribution depends on the last token only: rows of `table` [V, V]."""

    class Cache:
        def __init__(self, capacity):
            self.seq_len, self.capacity = 0, capacity

    def __init__(self, table):
        self.logits = torch.tensor(table, dtype=torch.float64).log().float()
        self.vocab_size, self.device, self.max_positions = len(table), torch.device("cpu"), 64

    def new_cache(self, batch_size, capacity):
        return Bigram.Cache(capacity)

    def forward(self, input_ids, cache):
        cache.seq_len += input_ids.shape[1]
        assert cache.seq_len <= cache.capacity, "the toy model's cache is full: was it rolled back?"
        return self.logits[input_ids]


TOY_TARGET = [[0.1, 0.6, 0.2, 0.1], [0.5, 0.1, 0.1, 0.3], [0.2, 0.2, 0.5, 0.1], [0.3, 0.3, 0.1, 0.3]]
TOY_DRAFT = [[0.4, 0.2, 0.2, 0.2], [0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.6, 0.2, 0.1]]


def tempered(table, temperature: float) -> torch.Tensor:
    """Rows softmax(log(table) / temperature), in float64."""
    t = torch.tensor(table, dtype=torch.float64) ** (1 / temperature)
    return t / t.sum(-1, keepdim=True)


def pair_distribution(first: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """P(y2, y3) flattened, when y1 ~ first, y2 ~ rows[y1] and y3 ~ rows[y2]."""
    return (first[:, None, None] * rows[:, :, None] * rows[None]).sum(0).flatten()


def loop_pairs(first, sampled, passed, verify, greedy=False) -> torch.Tensor:
    """P(y2, y3) flattened, worked out exactly for the loop on bigram models with k = 2 (3 new tokens after [0]):
    y1 ~ first (the prefill); in each round the draft samples from the rows `sampled`, hands the rows `passed` to
    verification as q, and verification keeps or replaces drafts with the rows `verify` as p, by the rejection rule
    (greedy=True: by greedy_verify's rule). Right: sampled = passed = the draft's tempered rows, verify = the
    target's; then this is pair_distribution(first, verify). A mistake is another choice of rows or rule."""
    vocab = len(first)

    def keep(c, d):  # P(keep draft d after token c)
        if greedy:
            return float(d == int(verify[c].argmax()))
        return min(1.0, float(verify[c, d] / passed[c, d]))

    def replacement(c):  # the token emitted at a rejection after token c
        if greedy:
            return torch.nn.functional.one_hot(verify[c].argmax(), vocab).double()
        residual = (verify[c] - passed[c]).clamp(min=0)
        return residual / residual.sum() if residual.sum() > 0 else verify[c]

    def first_of_a_round(c):  # the first token a round emits after token c
        kept = torch.tensor([sampled[c, d] * keep(c, d) for d in range(vocab)], dtype=torch.float64)
        return kept + (1 - kept.sum()) * replacement(c)

    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    for y1 in range(vocab):
        for d1 in range(vocab):
            weight, kept = first[y1] * sampled[y1, d1], keep(y1, d1)
            joint[d1] += weight * kept * first_of_a_round(d1)  # d1 kept: y3 is the round's next token
            joint += weight * (1 - kept) * replacement(y1)[:, None] * torch.stack(  # rejected: y3 opens a new round
                [first_of_a_round(y2) for y2 in range(vocab)])
    return joint.flatten()


def sampled_pairs(spec, samples: int, temperature: float, seed: int, draft=TOY_DRAFT) -> torch.Tensor:
    """y2 * 4 + y3 for `samples` runs of the loop (toy bigram models, k = 2, 3 new tokens after the prompt [0])."""
    generator = torch.Generator().manual_seed(seed)
    target, draft = Bigram(TOY_TARGET), Bigram(draft)
    pairs = []
    for _ in range(samples):
        tokens, _ = spec.speculative_generate(target, draft, torch.tensor([[0]]), 3, 2, temperature, generator)
        pairs.append(int(tokens[0, 1]) * 4 + int(tokens[0, 2]))
    return torch.tensor(pairs)


def pair_statistic(got: torch.Tensor, joint: torch.Tensor) -> float:
    """Chi-square of the observed pairs against `joint`; infinite if a pair of probability 0 came out."""
    counts, expected = torch.bincount(got, minlength=16).double(), len(got) * joint
    if bool((counts[expected == 0] > 0).any()):
        return math.inf
    support = expected > 0
    return float(((counts - expected)[support] ** 2 / expected[support]).sum())


PAIR_CRITICAL = 56.49  # 16 cells, 15 degrees of freedom: chi-square critical value at a false-failure rate of 1e-6


def check_pairs(got: torch.Tensor, temperature: float, draft=TOY_DRAFT) -> None:
    """The 2nd and 3rd tokens must follow the target at `temperature`; name a mistake whose distribution fits."""
    t, q = tempered(TOY_TARGET, temperature), tempered(draft, temperature)
    joint = pair_distribution(t[0], t)  # P(y2, y3) after the prompt [0]
    stat = pair_statistic(got, joint)
    if stat < PAIR_CRITICAL:
        return
    greedy_first = torch.zeros(4, dtype=torch.float64)
    greedy_first[int(t[0].argmax())] = 1
    mistakes = {  # every distribution a mistake gives that differs from the right one here
        "the first token (after the prefill) taken by argmax instead of sampled": loop_pairs(greedy_first, q, q, t),
        "the target's probabilities in the verification not divided by the temperature (p = softmax(logits / "
        "temperature), like the draft's q)": loop_pairs(t[0], q, q, tempered(TOY_TARGET, 1.0)),
        "the target's logits divided by the temperature twice in the verification (p = softmax(logits / "
        "temperature), once)": loop_pairs(t[0], q, q, tempered(TOY_TARGET, temperature**2)),
        "the draft samples at the temperature but hands rejection_sample its untempered probabilities: q must be "
        "the distribution its tokens were drawn from, softmax(logits / temperature)": loop_pairs(
            t[0], q, tempered(draft, 1.0), t),
        "verification by greedy_verify's rule at temperature > 0: sampled drafts are verified by rejection_sample "
        "(keep x with probability min(1, p(x)/q(x)))": loop_pairs(t[0], q, q, t, greedy=True),
        "the draft takes its argmax instead of sampling: the draft samples its tokens from q = softmax(logits / "
        "temperature), the rows it hands over": loop_pairs(
            t[0], torch.nn.functional.one_hot(q.argmax(-1), len(q)).double(), q, t),
    }  # fmt: skip
    fits = [name for name, dist in mistakes.items() if (dist - joint).abs().max() > 1e-6
            and pair_statistic(got, dist) < PAIR_CRITICAL]  # fmt: skip
    samples = len(got)
    counts = torch.bincount(got, minlength=16).double()
    pytest.fail(
        f"at temperature {temperature}, the 2nd and 3rd sampled tokens (pairs, 16 cells) must follow the target: "
        f"expected {[round(x, 3) for x in joint.tolist()]}, got {[round(x, 3) for x in (counts / samples).tolist()]} "
        f"(chi-square {stat:.1f}, 15 degrees of freedom, critical {PAIR_CRITICAL}). "
        + (f"This looks like: {fits[0]}." if len(fits) == 1 else
           "Check that every distribution is softmax(logits / temperature), the temperature applied once (the "
           "prefill's, the draft's and the verify pass's), that rejection_sample gets the q rows the draft sampled "
           "from and the verify pass's rows as p"),
        pytrace=False,
    )


def test_sampled_tokens_follow_the_target_end_to_end(spec):
    """Sampling through the whole loop (toy bigram models, k = 2): tokens 2 and 3 come out of a verification round,
    and their joint distribution must be the target's, whatever the draft."""
    check_pairs(sampled_pairs(spec, 3000, 1.0, seed=5), 1.0)


# A draft whose rows each put 0.85 on one token: tempering moves them far (0.85 becomes 0.99 at temperature 0.5), so
# a q that is not the one the draft sampled from shows within 1500 runs (an expected chi-square above 250).
PEAKED_DRAFT = [[0.05, 0.85, 0.05, 0.05], [0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]]


def test_sampling_divides_both_models_logits_by_the_temperature(spec):
    """The same at temperature 0.5, with a peaked draft: every distribution is softmax(logits / 0.5), the target's in
    the prefill and in every verification, and the draft's both for sampling and as the q it hands over (the rule
    keeps the output exact whatever q is, as long as q is what the draft sampled from)."""
    check_pairs(sampled_pairs(spec, 1500, 0.5, seed=6, draft=PEAKED_DRAFT), 0.5, PEAKED_DRAFT)


@pytest.mark.parametrize(
    "mistake",
    [
        "k < 1",
        "vocabularies that differ",
        "a batch of two prompts",
        "no new tokens",
        "negative ids",
        "ids past the vocabulary",
        "an int32 prompt",
        "a negative temperature",
        "past max positions",
    ],
)
def test_speculative_generate_rejects_bad_input(spec, target, drafts, mistake):
    ids = prompt(0)

    class SmallVocab(Contrary):
        def __init__(self, model):
            super().__init__(model)
            self.vocab_size = 200

    args = {
        "k < 1": (target, drafts["trained draft"], ids, 4, 0),
        "vocabularies that differ": (target, SmallVocab(drafts["trained draft"]), ids, 4, 2),
        "a batch of two prompts": (target, drafts["trained draft"], ids.repeat(2, 1), 4, 2),
        "no new tokens": (target, drafts["trained draft"], ids, 0, 2),
        "negative ids": (target, drafts["trained draft"], ids - 300, 4, 2),
        "ids past the vocabulary": (target, drafts["trained draft"], ids.clamp(max=0) + target.vocab_size, 4, 2),
        "an int32 prompt": (target, drafts["trained draft"], ids.int(), 4, 2),
        "a negative temperature": (target, drafts["trained draft"], ids, 4, 2, -1.0),
        "past max positions": (target, drafts["trained draft"], ids, target.max_positions, 2),
    }[mistake]
    expect_error(ValueError, lambda: spec.speculative_generate(*args), f"speculative_generate with {mistake}")


def test_speculative_generate_checks_max_positions_itself(spec):
    """A model whose cache does not check its own positions: prompt + max_new_tokens + k past its 64 positions must
    be refused by speculative_generate, not run past the end."""
    target, draft = Bigram(TOY_TARGET), Bigram(TOY_DRAFT)
    expect_error(
        ValueError,
        lambda: spec.speculative_generate(target, draft, torch.tensor([[0]]), 64, 2),
        "1 prompt token + 64 new tokens + k = 2 is 67 positions, past the toy models' max_positions = 64: "
        "speculative_generate must check it itself (ValueError)",
    )


# --- speed (GPU): ratios measured in this run, thresholds in thresholds.toml ----------------------------------------

SPEED_K = 6  # the reference's best k on an H200 (notes: BENCHMARKS.md)
SPEED_NEW = 256


@pytest.fixture(scope="module")
def gpu_pair():
    hf = load_hf("target", dtype=torch.float16, device="cuda")
    return hf, CachedModel(hf), CachedModel(load_hf("draft", dtype=torch.float16, device="cuda"))


@pytest.mark.speed
@pytest.mark.points(2)
def test_speculative_decoding_beats_target_only_decoding(spec, gpu_pair, speed):
    hf, target, draft = gpu_pair
    text = heldout_bytes()
    identical, checked, stats_seen = [], [], []

    starts = torch.linspace(0, len(text) - 65, 24).long().tolist()  # fixed prompts: both loops see the same ones
    calls = {"baseline": 0, "speculative": 0}

    def prompts(which):
        def setup():
            start = starts[calls[which] % len(starts)]
            calls[which] += 1
            return (encode(text[start : start + 64]).cuda(),), {}

        return setup

    def check_baseline(tokens, ids):
        assert tokens.shape == (1, SPEED_NEW)

    def speculative(ids):
        tokens, stats = spec.speculative_generate(target, draft, ids, SPEED_NEW, SPEED_K)
        stats_seen.append(stats)
        return tokens

    def check(tokens, ids):
        expected = greedy_decode(target, ids, SPEED_NEW)
        assert tokens.shape == (1, SPEED_NEW), f"expected [1, {SPEED_NEW}] tokens, got {list(tokens.shape)}"
        same = torch.equal(tokens, expected)
        identical.append(same)
        if not same:  # fp16: a verify pass over k + 1 rows may round a near-tie differently from a one-row step
            with torch.no_grad():
                logits = hf(torch.cat([ids, tokens], 1)).logits[0, ids.shape[1] - 1 : -1].float()
            gap = logits.max(-1).values - logits.gather(-1, tokens[0, :, None]).squeeze(-1)
            assert bool((gap <= 0.02 * logits.std()).all()), (
                f"speculative tokens are not the target's greedy tokens: worst logit gap {float(gap.max()):.3f}"
            )
        checked.append(1)

    baseline = speed.time(lambda ids: greedy_decode(target, ids, SPEED_NEW), prompts("baseline"), rounds=20, warmup=2,
                          check=check_baseline)  # fmt: skip
    ours = speed.bench(speculative, prompts("speculative"), rounds=20, warmup=2, check=check)
    accepted = sum(s["accepted"] for s in stats_seen) / max(1, sum(s["drafted"] for s in stats_seen))
    speed.judge(
        "speedup_over_target_only",
        baseline.median / ours.median,
        detail=f"k = {SPEED_K}, acceptance {accepted:.2f}, {SPEED_NEW / ours.median:.0f} tokens/s against "
        f"{SPEED_NEW / baseline.median:.0f}; identical greedy output in {sum(identical)} of {len(identical)} runs",
    )
