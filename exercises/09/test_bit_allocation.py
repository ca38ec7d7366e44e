"""Exercise 09 specification, mixed bit widths: the cost of a choice, the measurement, the exact allocation, the mix.

The allocation is checked on hand-made tables whose optimal mixes are known (some where a greedy allocation fails,
some with layers of different sizes) and on seeded random tables against an exhaustive search written here; the
measurement and the mixed quantization on a two-layer course model, watching what they hand the quantizer; and end
to end, by the perplexity a 3.0 bpw mix leaves on held-out text against uniform 3-bit GPTQ (3.148 bpw). The
quantizer is the tests' own GPTQ (`GPTQ` below): students' repos ship no solutions, and the allocation is what is
graded here.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fixtures.checks import expect_error
from fixtures.quantization import LINEARS, course_llama, decoder_layer, forward, text_windows

THRESHOLDS = Path(__file__).resolve().parent / "thresholds.toml"
WIDTHS = (2, 3, 4, 5, 6, 8)
COURSE_OPTIONS = tuple((bits, 128) for bits in WIDTHS)
CALIBRATION_WINDOWS, EVALUATION_WINDOWS, WINDOW = 16, 64, 256


@pytest.fixture
def alloc(impl):
    return impl("bit_allocation")


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_no_grad():
    """One CPU thread (GPTQ's column loop is thousands of small operations; a second thread only spins), no grad."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


# --- the quantizer the tests hand in: GPTQ at any width from 2 to 8 bits ---------------------------------------------


def grid(groups: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """groups [..., G], top [...] -> (scale, zero point) of exercise 08's min/max grid, the scale rounded to fp16."""
    scale = ((groups.amax(-1) - groups.amin(-1)).clamp_min(1e-5) / top).half().float()
    return scale, torch.minimum((-torch.round(groups.amin(-1) / scale)).clamp_min(0), top)


def gptq_every_width(weight: torch.Tensor, hessian: torch.Tensor, group_size: int) -> dict[int, torch.Tensor]:
    """Exercise 08's GPTQ (act-order, static groups, damping 0.01, blocks of 128) at every width of WIDTHS at once.

    GPTQ treats the rows of W independently given H, so the rows of every width are stacked and one pass over the
    columns quantizes them all. Works on W transposed: column c of W is the contiguous row c here.
    """
    N, K = weight.shape
    top = torch.tensor([2.0**bits - 1 for bits in WIDTHS]).repeat_interleave(N)
    W = weight.detach().float().repeat(len(WIDTHS), 1)
    H = hessian.detach().float().clone()
    unused = H.diagonal() == 0
    H[unused, unused] = 1
    W[:, unused] = 0
    scale, zero = grid(W.view(-1, K // group_size, group_size), top[:, None])
    order = torch.argsort(H.diagonal(), descending=True, stable=True)
    H = H[order][:, order]
    H.diagonal().add_(0.01 * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Wt = W[:, order].T.contiguous()
    S, Z = scale[:, order // group_size].T.contiguous(), zero[:, order // group_size].T.contiguous()
    out = torch.empty_like(Wt)
    for b0 in range(0, K, 128):
        b1 = min(b0 + 128, K)
        errors = torch.empty(b1 - b0, Wt.shape[1])
        for c in range(b0, b1):
            q = torch.minimum(torch.round(Wt[c] / S[c]).add_(Z[c]).clamp_(min=0), top).sub_(Z[c]).mul_(S[c])
            out[c] = q
            torch.sub(Wt[c], q, out=errors[c - b0]).div_(U[c, c])
            Wt[c + 1 : b1].addr_(U[c, c + 1 : b1], errors[c - b0], alpha=-1)
        Wt[b1:].addmm_(U[b0:b1, b1:].T, errors, alpha=-1)
    fake = out[torch.argsort(order)].T.reshape(len(WIDTHS), N, K)
    return dict(zip(WIDTHS, fake, strict=True))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


class GPTQ:
    """quantize(weight [N, K], hessian [K, K], bits, group_size) -> fake-quantized float32 [N, K]; every call kept.

    The first call for a (weight, hessian, group size) quantizes at every width (one pass); the others are looked up.
    """

    def __init__(self):
        self.done: dict = {}
        self.calls: list = []

    def __call__(self, weight, hessian, bits, group_size):
        self.calls.append((weight.detach().clone(), hessian.detach().clone(), bits, group_size))
        key = (digest(weight), digest(hessian), group_size)
        if key not in self.done:
            self.done[key] = gptq_every_width(weight, hessian, group_size)
        return self.done[key][bits].clone()


class RTN(GPTQ):
    """Round to nearest on exercise 08's grid (the Hessian unused): quick, for the tests that watch the calls."""

    def __call__(self, weight, hessian, bits, group_size):
        self.calls.append((weight.detach().clone(), hessian.detach().clone(), bits, group_size))
        N, K = weight.shape
        groups = weight.detach().float().reshape(N, K // group_size, group_size)
        top = torch.tensor(2.0**bits - 1)
        scale, zero = grid(groups, top)
        s, z = scale[..., None], zero[..., None]
        return ((torch.minimum(torch.round(groups / s) + z, top).clamp(min=0) - z) * s).reshape(N, K)


# --- what a choice costs --------------------------------------------------------------------------------------------


STORAGE_CASES = [  # (shape, bits, group size): N K bits code bits + N K/G groups x (16 scale bits + bits zero bits)
    ((512, 256), 4, 128),
    ((256, 768), 3, 128),
    ((1536, 256), 2, 32),
    ((256, 256), 8, 64),
    ((16, 96), 5, 96),
]


def test_storage_counts_codes_scales_and_zero_points(alloc):
    for (N, K), bits, group in STORAGE_CASES:
        got = alloc.storage_bits((N, K), bits, group)
        expected = N * K * bits + N * (K // group) * (16 + bits)
        assert isinstance(got, int), f"storage_bits returns an int (bits), got {type(got).__name__}"
        if got == expected:
            continue
        mistakes = {
            N * K * bits: "the bits of scales and zero points forgotten (codes only)",
            N * K * bits + N * (K // group) * 16: "the zero points forgotten (scales only)",
            N * K * bits + N * (K // group) * 32: "zero points counted as 16-bit (they are stored in `bits` bits)",
            N * K * bits + N * (16 + bits): "one scale per row instead of one per group",
        }
        pytest.fail(f"storage_bits({(N, K)}, {bits}, {group}): expected {expected} = {N * K * bits} code bits + "
                    f"{N * (K // group)} groups x (16 + {bits}), got {got}"
                    + (f": {mistakes[got]}" if got in mistakes else ""), pytrace=False)  # fmt: skip
    expect_error(ValueError, lambda: alloc.storage_bits((16, 96), 4, 64), "storage_bits with G = 64 not dividing 96")
    expect_error(ValueError, lambda: alloc.storage_bits((16, 96), 1, 32), "storage_bits at 1 bit")
    expect_error(ValueError, lambda: alloc.storage_bits((16, 96), 9, 32), "storage_bits at 9 bits")


def test_output_error_is_relative_to_the_layers_output(alloc):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(300, 64, generator=generator) * torch.logspace(-1, 1, 64)
    weight = torch.randn(32, 64, generator=generator)
    fake = weight + 0.05 * torch.randn(32, 64, generator=generator)
    H = 2 * x.T @ x / x.shape[0]
    got = alloc.output_error(weight, fake, H)
    xd = x.double()
    expected = float((xd @ (weight - fake).double().T).pow(2).sum() / (xd @ weight.double().T).pow(2).sum())
    assert isinstance(got, float), f"output_error returns a Python float, got {type(got).__name__}"
    if math.isclose(got, expected, rel_tol=1e-6):
        return
    weight_error = float((weight - fake).double().pow(2).sum() / weight.double().pow(2).sum())
    absolute = float((xd @ (weight - fake).double().T).pow(2).sum() / x.shape[0])
    named = ("the weights' error instead of the output's" if math.isclose(got, weight_error, rel_tol=1e-4) else
             "an absolute error, not relative to the output" if math.isclose(got, absolute, rel_tol=1e-4) else "")
    pytest.fail(f"output_error: expected ||X (W - Q)^T||^2 / ||X W^T||^2 = {expected:.6g}, got {got:.6g}"
                + (f": {named}" if named else ""), pytrace=False)  # fmt: skip


# --- the allocation: hand-made tables with known optima --------------------------------------------------------------


def table(alloc, layers: dict) -> dict:
    """{key: (numel, [(storage bits, error), ...])} -> Measurements (bits and group size are labels here)."""
    return {key: alloc.Measurement(numel, tuple(alloc.Choice(2 + i, 1, cost, error) for i, (cost, error)
                                               in enumerate(choices)))  # fmt: skip
            for key, (numel, choices) in layers.items()}


def exhaustive(measurements: dict, target: float) -> float:
    """The least total error over every mix whose storage is at most target x the weights (math.inf if none)."""
    keys = list(measurements)
    budget = target * sum(measurements[k].numel for k in keys)
    best = math.inf
    for mix in itertools.product(*(measurements[k].choices for k in keys)):
        if sum(c.storage_bits for c in mix) <= budget:
            best = min(best, sum(c.error for c in mix))
    return best


def greedy(measurements: dict, target: float, by_error_alone: bool) -> dict:
    """From every layer's cheapest choice, repeatedly take the single upgrade with the best error saved per extra bit
    (or the most error saved) that still fits."""
    budget = target * sum(m.numel for m in measurements.values())
    mix = {k: min(m.choices, key=lambda c: c.storage_bits) for k, m in measurements.items()}
    while True:
        spent = sum(c.storage_bits for c in mix.values())
        upgrades = [(k, c) for k, m in measurements.items() for c in m.choices
                    if c.storage_bits > mix[k].storage_bits and c.error < mix[k].error
                    and spent - mix[k].storage_bits + c.storage_bits <= budget]  # fmt: skip
        if not upgrades:
            return mix

        def gain(upgrade):
            k, c = upgrade
            saved = mix[k].error - c.error
            return saved if by_error_alone else saved / (c.storage_bits - mix[k].storage_bits)

        k, c = max(upgrades, key=gain)
        mix[k] = c


HAND_MADE = {
    # Upgrading B saves 3 per bit, A 2.5 per bit: greedy by efficiency upgrades B and then cannot afford A.
    "greedy by error saved per bit fails": ({"A": (1, [(2, 10.0), (6, 0.0)]), "B": (1, [(2, 3.0), (3, 0.0)])}, 4.0),
    # A saves the most error but costs as much as B and C together, which save more.
    "greedy by error alone fails": (
        {"A": (1, [(2, 10.0), (10, 0.0)]), "B": (1, [(2, 6.0), (4, 0.0)]), "C": (1, [(2, 6.0), (4, 0.0)])}, 14 / 3),
    # 5 bits per weight over 4 weights is 20 bits: A at 8 bits and B at 2 fits; A at 2 and B at 8 is 26 bits, though
    # the mean of the two layers' own bits per weight (2 and 8) is 5.
    "layers of different sizes": ({"A": (1, [(2, 4.0), (8, 1.0)]), "B": (3, [(6, 50.0), (24, 0.0)])}, 5.0),
    # Several widths per layer, the last of which is never worth its bits.
    "three layers, four widths": ({"A": (2, [(4, 9.0), (6, 4.0), (8, 1.5), (16, 1.4)]),
                                   "B": (4, [(8, 8.0), (12, 3.0), (16, 1.0), (32, 0.9)]),
                                   "C": (2, [(4, 2.0), (6, 1.0), (8, 0.5), (16, 0.45)])}, 3.5),  # fmt: skip
    # A target met exactly by one mix: it must be taken (at most, not below).
    "a target met exactly": ({"A": (1, [(2, 5.0), (3, 1.0)]), "B": (1, [(2, 5.0), (4, 2.0)])}, 3.5),
}


def judge_mix(alloc, measurements, target, mix, what):
    keys = list(measurements)
    assert isinstance(mix, dict) and set(mix) == set(keys), (
        f"{what}: allocate returns {{key: Choice}} for every layer, got "
        f"{sorted(mix) if isinstance(mix, dict) else type(mix).__name__}"
    )
    for k in keys:
        assert mix[k] in measurements[k].choices, f"{what}: {k!r} got {mix[k]!r}, which is not one of its choices"
    total = sum(measurements[k].numel for k in keys)
    spent = sum(mix[k].storage_bits for k in keys)
    error = sum(mix[k].error for k in keys)
    optimum = exhaustive(measurements, target)
    if spent > target * total:
        layer_mean = sum(mix[k].storage_bits / measurements[k].numel for k in keys) / len(keys)
        why = (": the budget averaged over layers instead of weights (the mean of the layers' own bits per weight "
               f"is {layer_mean:.3f}, but a layer of more weights costs more bits)" if layer_mean <= target else "")
        pytest.fail(f"{what}: the mix costs {spent} bits for {total} weights, {spent / total:.4f} bits per weight, "
                    f"over the target {target:.4f}{why}", pytrace=False)  # fmt: skip
    if error > optimum * (1 + 1e-9) + 1e-12:
        named = [f"greedy by {'error alone' if alone else 'error saved per bit'}" for alone in (False, True)
                 if {k: c.storage_bits for k, c in greedy(measurements, target, alone).items()}
                 == {k: c.storage_bits for k, c in mix.items()}]  # fmt: skip
        pytest.fail(f"{what}: the mix's total error is {error:.6g}, the least under the target is {optimum:.6g}: not "
                    "the optimum" + (f" ({named[0]}, as an allocation that is not exact does)" if named else ""),
                    pytrace=False)  # fmt: skip


@pytest.mark.points(2)
@pytest.mark.parametrize("case", HAND_MADE)
def test_allocation_is_optimal_on_hand_made_tables(alloc, case):
    layers, target = HAND_MADE[case]
    measurements = table(alloc, layers)
    judge_mix(alloc, measurements, target, alloc.allocate(measurements, target), case)


def random_table(alloc, seed: int, layers: int = 5) -> dict:
    """Layers of several sizes; six widths each with the storage of storage_bits and a falling random error."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for layer in range(layers):
        N, K = [(64, 32), (32, 96), (128, 32), (32, 32)][int(torch.randint(4, (1,), generator=generator))]
        errors = torch.rand(len(WIDTHS), generator=generator).sort(descending=True).values * 10.0 ** -torch.arange(6)
        result[(layer, "w")] = alloc.Measurement(N * K, tuple(
            alloc.Choice(bits, 32, N * K * bits + N * (K // 32) * (16 + bits), float(e))
            for bits, e in zip(WIDTHS, errors.tolist(), strict=True)))  # fmt: skip
    return result


@pytest.mark.points(2)
@pytest.mark.parametrize("seed", range(6))
def test_allocation_equals_an_exhaustive_search_on_random_tables(alloc, seed):
    measurements = random_table(alloc, seed)
    for target in (2.7, 3.0, 3.6, 4.3, 5.5, 8.6):
        judge_mix(alloc, measurements, target, alloc.allocate(measurements, target), f"seed {seed}, target {target}")


def test_allocation_at_a_uniform_width_budget_is_never_worse_than_that_width(alloc):
    measurements = random_table(alloc, 11, layers=6)
    total = sum(m.numel for m in measurements.values())
    for i, bits in enumerate(WIDTHS):
        target = sum(m.choices[i].storage_bits for m in measurements.values()) / total
        mix = alloc.allocate(measurements, target)
        judge_mix(alloc, measurements, target, mix, f"at the {bits}-bit budget")
        uniform = sum(m.choices[i].error for m in measurements.values())
        assert sum(c.error for c in mix.values()) <= uniform, f"at the {bits}-bit budget the mix is worse than uniform"


BAD_TARGETS = {
    "a target below the cheapest mix": 1.5,
    "a target of zero": 0.0,
    "a target of NaN": math.nan,
}


@pytest.mark.parametrize("bad", BAD_TARGETS)
def test_allocation_rejects_targets_no_mix_meets(alloc, bad):
    measurements = random_table(alloc, 3)
    expect_error(ValueError, lambda: alloc.allocate(measurements, BAD_TARGETS[bad]), f"allocate with {bad}")


# --- measuring the course model, and quantizing it with a mix --------------------------------------------------------


def two_layers():
    return course_llama(layers=2), text_windows("calibration", 64, 4)  # 256 tokens


def reference_hessian(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).double()
    return 2 * flat.T @ flat / flat.shape[0]


def same_hessian(seen: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(seen.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.points(2)
def test_measure_quantizes_every_linear_at_every_option_on_the_float_models_inputs(alloc):
    llama, calibration = two_layers()
    original = copy.deepcopy(llama)
    options = ((2, 64), (4, 128), (8, 32))
    quantizer = RTN()
    table = alloc.measure(llama, calibration, quantizer, options)
    keys = {(layer, name) for layer in range(2) for name in LINEARS}
    assert isinstance(table, dict) and set(table) == keys, (
        f"measure returns {{(layer, name): Measurement}} for all {len(keys)} linears, got "
        f"{sorted(table) if isinstance(table, dict) else type(table).__name__}"
    )
    for layer in range(2):
        for name in LINEARS:
            assert torch.equal(getattr(llama.layers[layer], name), getattr(original.layers[layer], name)), (
                f"measure changed layer {layer}'s {name}: measuring must leave the model as it was"
            )
    hidden = original.embed(calibration)
    for layer in range(2):
        hidden, inputs = decoder_layer(original, layer, hidden)
        for name in LINEARS:
            weight = getattr(original.layers[layer], name)
            H = reference_hessian(inputs[name])
            measured = table[(layer, name)]
            assert measured.numel == weight.numel(), f"layer {layer} {name}: numel {measured.numel}, expected " \
                                                     f"{weight.numel()}"  # fmt: skip
            assert [(c.bits, c.group_size) for c in measured.choices] == list(options), (
                f"layer {layer} {name}: one Choice per option, in the options' order: expected {list(options)}, got "
                f"{[(c.bits, c.group_size) for c in measured.choices]}"
            )
            calls = [c for c in quantizer.calls if c[0].shape == weight.shape and torch.equal(c[0], weight)]
            assert sorted((b, g) for _, _, b, g in calls) == sorted(options), (
                f"layer {layer} {name}: the quantizer must be called once per option with the float weight, got "
                f"{sorted((b, g) for _, _, b, g in calls)}"
            )
            if not all(same_hessian(h, H) for _, h, _, _ in calls):
                pytest.fail(f"layer {layer} {name}: the Hessian handed to the quantizer is not 2 X^T X / n of the "
                            "layer's input in the float model (measure every layer on the float model's activations)",
                            pytrace=False)  # fmt: skip
            for choice in measured.choices:
                fake = RTN()(weight, H.float(), choice.bits, choice.group_size)
                D = (weight - fake).double()
                expected = float(((D @ H) * D).sum() / ((weight.double() @ H) * weight.double()).sum())
                assert math.isclose(choice.error, expected, rel_tol=1e-4), (
                    f"layer {layer} {name} at {choice.bits} bits, G = {choice.group_size}: error {choice.error:.6g}, "
                    f"expected the relative output error of the quantizer's result, {expected:.6g}"
                )
                cost = weight.shape[0] * weight.shape[1] * choice.bits + weight.shape[0] * (
                    weight.shape[1] // choice.group_size) * (16 + choice.bits)  # fmt: skip
                assert choice.storage_bits == cost, (
                    f"layer {layer} {name} at {choice.bits} bits, G = {choice.group_size}: storage "
                    f"{choice.storage_bits} bits, expected {cost} (codes, scales and zero points)"
                )


def mixed_choices(alloc, llama) -> dict:
    """A mix with a different width and group size per linear: layer 0 at 2 and 3 bits, layer 1 at 4, 5, 6, 8."""
    widths = {(0, "qkv"): 2, (0, "out"): 3, (0, "gate_up"): 3, (0, "down"): 2,
              (1, "qkv"): 4, (1, "out"): 5, (1, "gate_up"): 6, (1, "down"): 8}  # fmt: skip
    return {(layer, name): alloc.Choice(bits, 64 if name == "out" else 128, 0, 0.0)
            for (layer, name), bits in widths.items()}  # fmt: skip


@pytest.mark.points(2)
def test_quantize_mixed_gives_each_linear_its_choice_on_the_quantized_prefix(alloc):
    llama, calibration = two_layers()
    original = copy.deepcopy(llama)
    mix = mixed_choices(alloc, llama)
    quantizer = RTN()
    result = alloc.quantize_mixed(llama, calibration, mix, quantizer)
    assert result is None, "quantize_mixed quantizes the model in place and returns None"
    assert len(quantizer.calls) == 8, f"one quantizer call per linear (8 here), got {len(quantizer.calls)}"
    for layer in range(2):
        for name in LINEARS:
            weight = getattr(original.layers[layer], name)
            choice = mix[(layer, name)]
            calls = [c for c in quantizer.calls if c[0].shape == weight.shape and torch.equal(c[0], weight)]
            assert calls and (calls[0][2], calls[0][3]) == (choice.bits, choice.group_size), (
                f"layer {layer} {name}: the quantizer must get the float weight with its choice "
                f"({choice.bits} bits, G = {choice.group_size}), got {[(c[2], c[3]) for c in calls]}"
            )
            assert torch.equal(getattr(llama.layers[layer], name), RTN()(weight, calls[0][1], *calls[0][2:])), (
                f"layer {layer} {name}: the model's weight must be replaced by what the quantizer returned"
            )
    embedded = llama.embed(calibration)
    quantized_prefix = decoder_layer(llama, 0, embedded)[0]
    float_prefix = decoder_layer(original, 0, embedded)[0]
    for name in LINEARS:
        weight = getattr(original.layers[1], name)
        seen = next(h for w, h, _, _ in quantizer.calls if w.shape == weight.shape and torch.equal(w, weight))
        if same_hessian(seen, reference_hessian(decoder_layer(original, 1, quantized_prefix)[1][name])):
            continue
        if same_hessian(seen, reference_hessian(decoder_layer(original, 1, float_prefix)[1][name])):
            pytest.fail(f"layer 1 {name}: calibrated on the float model's activations instead of the quantized "
                        "prefix's: run each quantized layer to get the next layer's input", pytrace=False)  # fmt: skip
        pytest.fail(f"layer 1 {name}: the Hessian handed to the quantizer is not 2 X^T X / n of the layer's input "
                    "(the float layer 1 run on what the quantized layer 0 produced)", pytrace=False)  # fmt: skip


BAD_MODEL_CALLS = {
    "measure: an empty calibration set": lambda a, m, ids, mix: a.measure(m, ids[:0], RTN()),
    "measure: group size 96 (does not divide 256)": lambda a, m, ids, mix: a.measure(m, ids, RTN(), ((4, 96),)),
    "measure: 1-bit option": lambda a, m, ids, mix: a.measure(m, ids, RTN(), ((1, 128),)),
    "quantize_mixed: a mix missing a linear": lambda a, m, ids, mix: a.quantize_mixed(
        m, ids, {k: v for k, v in mix.items() if k != (1, "down")}, RTN()),
    "quantize_mixed: a choice of group size 100": lambda a, m, ids, mix: a.quantize_mixed(
        m, ids, {**mix, (1, "down"): a.Choice(4, 100, 0, 0.0)}, RTN()),
    "quantize_mixed: an empty calibration set": lambda a, m, ids, mix: a.quantize_mixed(m, ids[:0], mix, RTN()),
}  # fmt: skip


@pytest.mark.parametrize("bad", BAD_MODEL_CALLS)
def test_bad_input_raises_and_changes_nothing(alloc, bad):
    llama, calibration = two_layers()
    before = copy.deepcopy(llama)
    mix = mixed_choices(alloc, llama)
    expect_error((ValueError, TypeError), lambda: BAD_MODEL_CALLS[bad](alloc, llama, calibration, mix), bad)
    for layer, w in enumerate(llama.layers):
        for name in LINEARS:
            assert torch.equal(getattr(w, name), getattr(before.layers[layer], name)), (
                f"{bad} raised, but layer {layer}'s {name} was changed: validate before touching the model"
            )


# --- the course model: a 3.0 bpw mix against uniform 3-bit GPTQ (3.148 bpw) ------------------------------------------


def perplexity(llama, ids: torch.Tensor) -> float:
    """The test's own perplexity: exp of the mean negative log-likelihood of every predicted token."""
    logits = forward(llama, ids)[:, :-1].double()
    return math.exp(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))


@pytest.mark.points(3)
@pytest.mark.time_limit(300)
def test_a_3_bpw_mix_matches_uniform_3_bit_gptq_with_fewer_bits(alloc, request):
    from grader.thresholds import resolve

    calibration = text_windows("calibration", WINDOW, CALIBRATION_WINDOWS)
    evaluation = text_windows("evaluation", WINDOW, EVALUATION_WINDOWS)
    quantizer = GPTQ()
    measurements = alloc.measure(course_llama(), calibration, quantizer, COURSE_OPTIONS)
    total = sum(m.numel for m in measurements.values())
    mix = alloc.allocate(measurements, 3.0)
    spent = sum(c.storage_bits for c in mix.values()) / total
    assert spent <= 3.0, f"the 3.0 bpw mix costs {spent:.4f} bits per weight"
    uniform = {key: next(c for c in m.choices if c.bits == 3) for key, m in measurements.items()}
    table = {"fp32": perplexity(course_llama(), evaluation)}
    for label, chosen in (("uniform 3-bit", uniform), ("3.0 bpw mix", mix)):
        llama = course_llama()
        alloc.quantize_mixed(llama, calibration, chosen, quantizer)
        table[label] = perplexity(llama, evaluation)
    ratio = (table["3.0 bpw mix"] - table["fp32"]) / (table["uniform 3-bit"] - table["fp32"])
    impl = request.config.getoption("impl") or os.environ.get("INFERLAB_IMPL") or "student"
    threshold = resolve(THRESHOLDS, "mix_3bpw_increase_over_uniform_3bit", impl, None)
    widths = sorted({c.bits for c in mix.values()})
    text = ", ".join(f"{label} {p:.4f}" for label, p in table.items())
    assert threshold.passes(ratio), (
        f"{threshold.what}: {ratio:.3f}, needs {threshold.symbol} {threshold.value:g} ({threshold.source}). "
        f"Perplexity on {EVALUATION_WINDOWS} x {WINDOW} held-out tokens: {text}; the mix uses {spent:.4f} bits per "
        f"weight (uniform 3-bit: {sum(c.storage_bits for c in uniform.values()) / total:.4f}), widths {widths}"
    )
