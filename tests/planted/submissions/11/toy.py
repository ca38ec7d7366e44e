"""A hang at import: the module never finishes loading."""

while True:
    pass


def double(x):
    return 2 * x
