"""double is right; triple, scale and total are wrong (so the speed test's check fails too)."""


def double(x):
    return 2 * x


def triple(x):
    return 2 * x


def scale(x):
    return x


def total(x):
    return float(x.sum()) + 1
