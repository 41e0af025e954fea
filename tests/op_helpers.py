"""Helpers the op tests share."""


def count_calls(monkeypatch, owner, name):
    """Replace the function ``owner.<name>`` by a wrapper that counts its calls (undone with the
    test, through ``monkeypatch``); returns the count, a one-element list."""
    count = [0]
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)
    return count
