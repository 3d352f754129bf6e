"""PLACEHOLDER until issue 4 lands: the positional-encoding op."""


def positional_encoding(x, offset=0, *, scale=1.0, base=10000.0, batch_first=True):
    raise NotImplementedError("fasttf.positional_encoding: issue 4 in progress")
