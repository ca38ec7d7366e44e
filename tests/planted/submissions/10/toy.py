"""The control: a correct toy module (full marks)."""


def double(x):
    return 2 * x


def triple(x):
    return 3 * x


def scale(x):
    return 2 * x


def total(x):
    return float(x.sum())
