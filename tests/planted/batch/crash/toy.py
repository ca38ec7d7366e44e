"""A segmentation fault in scale, which its correctness test and the speed test both call."""

import ctypes


def double(x):
    return 2 * x


def triple(x):
    return 3 * x


def scale(x):
    return ctypes.string_at(0)


def total(x):
    return float(x.sum())
