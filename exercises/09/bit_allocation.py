"""Exercise 09: mixed bit widths under a bits-per-weight budget (EXL2's idea), solved exactly.

Exercise 08 gave every linear layer the same width. But layers are not equally hard: some lose little at 2 bits,
others much at 3. Measure each linear layer at several widths (its output error, and the bits each choice costs,
scales and zero points included), then choose one width per layer so that the whole model's average bits per weight
meets a target (2.5, 3.0, 4.0, ...) with the least total error. That is a multiple-choice knapsack: solve it exactly
(greedy upgrades can miss the optimum), then quantize the model with the chosen mix, layer by layer.

The quantizer is handed in: `quantize(weight [N, K] float32, hessian [K, K] float32, bits, group_size)` returns the
fake-quantized weight (float32 [N, K], the dequantized codes). The tests hand in GPTQ at 2 .. 8 bits (exercise 08's,
with act-order); you only call it. The model is `fixtures.llama.Llama` (`fixtures.quantization.course_llama()`);
`fixtures.quantization.decoder_layer` runs one layer and returns the input of each of its four linears (LINEARS).
Run `pytest exercises/09`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fixtures.quantization import LINEARS, decoder_layer  # noqa: F401

OPTIONS = ((2, 128), (3, 128), (4, 128), (5, 128), (6, 128), (8, 128))  # (bits, group size): GPTQ at 2 .. 8 bits


@dataclass(frozen=True)
class Choice:
    """One way to quantize one linear layer: its width, its group size, the bits it costs and the error it leaves.

    Given.
    """

    bits: int
    group_size: int
    storage_bits: int  # codes + fp16 scales + zero points, for the whole layer
    error: float  # relative output error on the calibration activations


@dataclass(frozen=True)
class Measurement:
    """One linear layer's measured choices: numel weights, one Choice per option, in the options' order. Given."""

    numel: int
    choices: tuple[Choice, ...]


def storage_bits(shape: tuple[int, int], bits: int, group_size: int) -> int:
    """Bits that a [N, K] weight takes at `bits` with groups of G = group_size input channels (exercise 08's layout):

        N * K codes of `bits` bits,  plus per row and group (N * K / G of them) an fp16 scale (16 bits) and a zero
        point stored in `bits` bits, like the codes.

    4 bits at G = 128 is 4 + 20/128 = 4.156 bits per weight, not 4. ValueError for bits outside 2 .. 8, a group size
    that does not divide K, or a shape that is not two positive ints.
    """
    # TODO: one line of arithmetic once the input is checked. Forgetting the scales and zero points makes every
    #  budget a lie: 3-bit codes at G = 32 really cost 3.6 bits per weight.
    raise NotImplementedError("storage_bits: N K bits + (N K / G) (16 + bits)")


def hessian(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> float32 [K, K] = 2 X^T X / n over its n tokens (exercise 08's GPTQ Hessian). ValueError: no token.
    """
    # TODO: flatten the leading dimensions into tokens; accumulate in float32.
    raise NotImplementedError("hessian: 2 X^T X / n over the n tokens of x")


def output_error(weight: torch.Tensor, fake: torch.Tensor, hessian: torch.Tensor) -> float:
    """The relative output error of replacing weight [N, K] by fake [N, K] for inputs X whose Hessian is H [K, K]:

        ||X (W - Q)^T||^2 / ||X W^T||^2  =  sum((D @ H) * D) / sum((W @ H) * W),   D = W - Q,  H = 2 X^T X / n

    (the factor 2 / n cancels). Relative, so that layers whose outputs differ in size compare on one scale. Compute
    in float64. ValueError for shapes that do not fit together.
    """
    # TODO: the second form needs only H: no activations kept per choice.
    raise NotImplementedError("output_error: sum((D H) * D) / sum((W H) * W) with D = W - fake")


def measure(llama, calibration: torch.Tensor, quantize, options=OPTIONS) -> dict[tuple[int, str], Measurement]:
    """Measure every linear layer of the float model at every option: {(layer, name): Measurement}.

    calibration: int64 token ids [B, T]. hidden = llama.embed(calibration); for each layer, decoder_layer(llama,
    layer, hidden) gives the layer's output (the next hidden) and its linears' inputs. For each linear, with
    H = hessian(its input) and W its weight (float32), and for each (bits, group_size) of options, in order:
    fake = quantize(W, H, bits, group_size), and a Choice(bits, group_size, storage_bits(W.shape, bits, group_size),
    output_error(W, fake, H)). Measurement(numel = W.numel(), choices).
    The model is left as it was (the quantizer gets copies, nothing is written back). Every layer is measured on the
    float model's activations: measuring is a survey, not a quantization.
    ValueError (before any work) for an empty calibration set or an option with bits outside 2 .. 8 or a group size
    that does not divide some linear's input channels.
    """
    # TODO: validate every option against every linear first; then one pass over the layers under torch.no_grad().
    raise NotImplementedError("measure: every linear at every option, its relative output error and storage bits")


def allocate(measurements: dict, target_bpw: float) -> dict[tuple[int, str], Choice]:
    """One Choice per layer with the least total error whose average bits per weight is at most target_bpw.

    The average is over *weights*: sum of the chosen storage_bits <= target_bpw * sum of every layer's numel (a
    layer of 3N weights at 8 bits costs three times one of N weights; a mean of the layers' own bits per weight
    would let a large layer take the bits a small one gave up). Solve it exactly, for example layer by layer over a
    frontier of partial mixes: extend every partial mix by every choice of the next layer, drop those that leave no
    room for the cheapest choices of the layers still to come, sort by cost and keep only mixes with less error
    than every cheaper one (a dearer mix with more error is never part of an optimum), remembering for each kept
    mix which mix it extended and which choice it took. At the end, the least error wins; walk back to read the mix.
    (A greedy allocation, upgrading whichever layer saves the most error, or the most error per bit, can miss the
    optimum: the tests have tables where it does.)
    Returns {key: the chosen Choice object} for every key, in the measurements' order. ValueError for a target that
    no mix meets (below the cheapest mix, not positive, not finite) or an empty table.
    """
    # TODO: the budget in bits is floor(target_bpw * total weights). torch.argsort(stable=True) and cummin help to
    #  keep the frontier; store the costs as int64 (they are exact) and the errors as float64.
    raise NotImplementedError("allocate: the least-error mix whose storage fits target_bpw * all weights, exactly")


def bits_per_weight(measurements: dict, mix: dict) -> float:
    """The mix's average bits per weight: every chosen storage_bits summed, over every layer's numel summed.

    ValueError unless the mix chooses for exactly the measured layers.
    """
    # TODO: weights, not layers, are what the average is over.
    raise NotImplementedError("bits_per_weight: sum of storage bits / sum of numel")


def quantize_mixed(llama, calibration: torch.Tensor, mix: dict, quantize) -> None:
    """Quantize every linear of `llama` in place with its choice in `mix` ({(layer, name): Choice}), layer by layer.

    As exercise 08's quantize_model: hidden = llama.embed(calibration); for each layer, decoder_layer(llama, layer,
    hidden) gives the inputs of its four linears (the layer still in float); replace each weight by
    quantize(W, hessian(input), choice.bits, choice.group_size); then run the *quantized* layer on hidden to get the
    next layer's input, so that every layer is calibrated on what the already-quantized layers before it produce.
    ValueError (before changing anything) for an empty calibration set, a mix that does not cover every linear, or a
    choice whose bits are outside 2 .. 8 or whose group size does not divide its linear's input channels.
    """
    # TODO: validate the whole mix first; then the loop, under torch.no_grad().
    raise NotImplementedError("quantize_mixed: layer by layer, each calibrated on the quantized layers' outputs")
