"""Exercise 09 reference solution: EXL2-style mixed bit widths, the least output error under a bits-per-weight budget.

Each linear layer is quantized at several widths (GPTQ at 2 .. 8 bits, handed in as `quantize`); each choice's cost is
counted in bits, codes plus fp16 scales plus zero points; its error is the layer's relative output error on the
calibration activations. The allocation is a multiple-choice knapsack, solved exactly: layer by layer, the Pareto
frontier of partial mixes (no other partial mix is both cheaper and better) over the layers seen so far, pruned to
the budget; the optimum is the frontier's least error at the end. The frontier holds at most one mix per distinct
total cost, so it stays small when costs share a large common factor, as whole groups of weights make them here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fixtures.quantization import LINEARS, decoder_layer

OPTIONS = ((2, 128), (3, 128), (4, 128), (5, 128), (6, 128), (8, 128))  # (bits, group size): GPTQ at 2 .. 8 bits
SCALE_BITS = 16  # one fp16 scale per group; the zero point is stored in `bits` bits, like the codes


@dataclass(frozen=True)
class Choice:
    """One way to quantize one linear layer: its width, its group size, the bits it costs and the error it leaves."""

    bits: int
    group_size: int
    storage_bits: int  # codes + fp16 scales + zero points, for the whole layer
    error: float  # relative output error on the calibration activations


@dataclass(frozen=True)
class Measurement:
    """One linear layer's measured choices: numel weights, one Choice per option, in the options' order."""

    numel: int
    choices: tuple[Choice, ...]


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def storage_bits(shape: tuple[int, int], bits: int, group_size: int) -> int:
    """Bits that a [N, K] weight quantized at `bits` with groups of G input channels takes: every code, and per row
    and group an fp16 scale and a zero point of `bits` bits."""
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"storage_bits: shape must be two positive ints (N, K), got {shape!r}")
    N, K = shape
    _check_option(bits, group_size, K, "storage_bits")
    return N * K * bits + N * (K // group_size) * (SCALE_BITS + bits)


def _check_option(bits, group_size, channels: int, name: str) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name}: bits must be an int from 2 to 8, got {bits!r}")
    if not isinstance(group_size, int) or group_size < 1 or channels % group_size:
        raise ValueError(f"{name}: group size {group_size!r} does not divide the {channels} input channels")


def hessian(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> float32 [K, K] = 2 X^T X / n over its n tokens (exercise 08's GPTQ Hessian)."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    if flat.shape[0] == 0:
        raise ValueError("hessian: no calibration tokens")
    return 2 * (flat.T @ flat) / flat.shape[0]


def output_error(weight: torch.Tensor, fake: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ||X (W - Q)^T||^2 / ||X W^T||^2, from the Hessian H = 2 X^T X / n (the factor cancels)."""
    if not (isinstance(weight, torch.Tensor) and isinstance(fake, torch.Tensor) and weight.shape == fake.shape
            and weight.dim() == 2):  # fmt: skip
        raise ValueError(f"output_error: weight and fake must be [N, K] alike, got {_describe(weight)} and "
                         f"{_describe(fake)}")  # fmt: skip
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (weight.shape[1],) * 2:
        raise ValueError(f"output_error: hessian must be [{weight.shape[1]}, {weight.shape[1]}], got "
                         f"{_describe(hessian)}")  # fmt: skip
    H = hessian.double()
    W = weight.detach().double()
    D = W - fake.detach().double()
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp_min(1e-300))


def _check_quantized(fake, weight: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(fake, torch.Tensor) or fake.shape != weight.shape or not bool(torch.isfinite(fake).all()):
        raise ValueError(f"{where}: the quantizer must return finite fake-quantized weights shaped like the weight "
                         f"{list(weight.shape)}, got {_describe(fake)}")  # fmt: skip
    return fake.float()


def _check_model_call(llama, calibration, name: str) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise TypeError(f"{name}: calibration must be int64 token ids [B, T], got {_describe(calibration)}")
    if calibration.numel() == 0:
        raise ValueError(f"{name}: the calibration set is empty")


def measure(llama, calibration: torch.Tensor, quantize, options=OPTIONS) -> dict[tuple[int, str], Measurement]:
    """Every linear layer of the float model, quantized at every option, on its own float inputs."""
    _check_model_call(llama, calibration, "measure")
    options = tuple(tuple(option) for option in options)
    if not options:
        raise ValueError("measure: no options to measure")
    for w in llama.layers:
        for name in LINEARS:
            for bits, group_size in options:
                _check_option(bits, group_size, getattr(w, name).shape[1], f"measure ({name})")
    table = {}
    with torch.no_grad():
        hidden = llama.embed(calibration)
        for layer, w in enumerate(llama.layers):
            hidden, inputs = decoder_layer(llama, layer, hidden)
            for name in LINEARS:
                weight = getattr(w, name).detach().float()
                H = hessian(inputs[name])
                choices = []
                for bits, group_size in options:
                    fake = _check_quantized(quantize(weight.clone(), H.clone(), bits, group_size), weight, "measure")
                    choices.append(Choice(bits, group_size, storage_bits(tuple(weight.shape), bits, group_size),
                                          output_error(weight, fake, H)))  # fmt: skip
                table[(layer, name)] = Measurement(weight.numel(), tuple(choices))
    return table


def _check_table(measurements) -> None:
    if not isinstance(measurements, dict) or not measurements:
        raise ValueError("allocate: measurements must be a non-empty dict {(layer, name): Measurement}")
    for key, m in measurements.items():
        if not isinstance(m, Measurement) or not m.choices or not isinstance(m.numel, int) or m.numel < 1:
            raise ValueError(f"allocate: {key!r} must be a Measurement with a positive numel and at least one choice")
        for c in m.choices:
            if not isinstance(c.storage_bits, int) or c.storage_bits < 0 or not math.isfinite(c.error):
                raise ValueError(f"allocate: {key!r} has a choice with storage {c.storage_bits!r} and error "
                                 f"{c.error!r}: storage must be a non-negative int, the error finite")  # fmt: skip


def allocate(measurements: dict, target_bpw: float) -> dict[tuple[int, str], Choice]:
    """The mix, one choice per layer, with the least total error whose bits per weight is at most target_bpw."""
    _check_table(measurements)
    if not isinstance(target_bpw, (int, float)) or not math.isfinite(target_bpw) or target_bpw <= 0:
        raise ValueError(f"allocate: target_bpw must be a positive number, got {target_bpw!r}")
    keys = list(measurements)
    total = sum(measurements[k].numel for k in keys)
    budget = math.floor(target_bpw * total)  # bits: the budget is per weight, over every weight of every layer
    cheapest = sum(min(c.storage_bits for c in measurements[k].choices) for k in keys)
    if cheapest > budget:
        raise ValueError(f"allocate: {target_bpw} bits per weight is below the cheapest mix, "
                         f"{cheapest / total:.4f} bits per weight")  # fmt: skip
    # Room left for the cheapest choice of every later layer: a partial mix that leaves too little is no mix.
    floors = [min(c.storage_bits for c in measurements[k].choices) for k in keys]
    later = [sum(floors[i + 1 :]) for i in range(len(keys))]
    # The frontier: partial mixes over the layers so far, sorted by cost, each strictly better than every cheaper one.
    cost = torch.zeros(1, dtype=torch.int64)
    error = torch.zeros(1, dtype=torch.float64)
    trail = []  # per layer: (the frontier entry each kept mix extends, the choice it adds)
    for key, room in zip(keys, later, strict=True):
        choices = measurements[key].choices
        add_cost = torch.tensor([c.storage_bits for c in choices], dtype=torch.int64)
        add_error = torch.tensor([c.error for c in choices], dtype=torch.float64)
        all_cost = (cost[:, None] + add_cost[None, :]).flatten()
        all_error = (error[:, None] + add_error[None, :]).flatten()
        fits = (all_cost + room <= budget).nonzero().flatten()
        all_cost, all_error = all_cost[fits], all_error[fits]
        order = torch.argsort(all_error, stable=True)  # by cost, then error
        order = order[torch.argsort(all_cost[order], stable=True)]
        sorted_error = all_error[order]
        best_before = torch.cat([torch.tensor([math.inf], dtype=torch.float64), sorted_error.cummin(0).values[:-1]])
        kept = order[sorted_error < best_before]
        cost, error = all_cost[kept], all_error[kept]
        trail.append((fits[kept] // len(choices), fits[kept] % len(choices)))
    index = int(torch.argmin(error))  # the least error; argmin takes the first, the cheapest of equal errors
    mix = {}
    for key, (parent, chosen) in zip(reversed(keys), reversed(trail), strict=True):
        mix[key] = measurements[key].choices[int(chosen[index])]
        index = int(parent[index])
    return {key: mix[key] for key in keys}


def bits_per_weight(measurements: dict, mix: dict) -> float:
    """The mix's average bits per weight: every layer's storage over every layer's weights (not a mean of layers)."""
    if set(mix) != set(measurements):
        raise ValueError("bits_per_weight: the mix must choose for every measured layer, and only those")
    return sum(mix[k].storage_bits for k in mix) / sum(measurements[k].numel for k in mix)


def quantize_mixed(llama, calibration: torch.Tensor, mix: dict, quantize) -> None:
    """Quantize every linear of `llama` in place with its choice in `mix`, layer by layer on the quantized prefix."""
    _check_model_call(llama, calibration, "quantize_mixed")
    expected = {(layer, name) for layer in range(len(llama.layers)) for name in LINEARS}
    if not isinstance(mix, dict) or set(mix) != expected:
        raise ValueError("quantize_mixed: the mix must hold one Choice for every (layer, name) of the model")
    for (layer, name), choice in mix.items():
        _check_option(choice.bits, choice.group_size, getattr(llama.layers[layer], name).shape[1], "quantize_mixed")
    with torch.no_grad():
        hidden = llama.embed(calibration)
        for layer, w in enumerate(llama.layers):
            inputs = decoder_layer(llama, layer, hidden)[1]  # this layer still in float, on the quantized prefix
            for name in LINEARS:
                weight = getattr(w, name)
                choice = mix[(layer, name)]
                fake = quantize(weight.detach().float().clone(), hessian(inputs[name]), choice.bits, choice.group_size)
                weight.copy_(_check_quantized(fake, weight, "quantize_mixed"))
            hidden = decoder_layer(llama, layer, hidden)[0]  # what the quantized layer hands the next one
