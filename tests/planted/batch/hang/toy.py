"""triple never returns."""


def double(x):
    return 2 * x


def triple(x):
    while x > 0:
        x = x + 1
    return x


def scale(x):
    return 2 * x


def total(x):
    return float(x.sum())
