"""``K=V,...`` text (``--model-kwargs``, ``--vs-kwargs``) read into keyword arguments."""
from __future__ import annotations
from .errors import UsageError

__all__ = ["parse_kv"]


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets, braces and quotes ('a=[1,2],b=x' -> ['a=[1,2]', 'b=x'])."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_kv(text: str) -> dict:
    """'a=1,b=x,dims=[32,64],c={k: 0.5}' -> {'a': 1, 'b': 'x', 'dims': [32, 64], 'c': {'k': 0.5}}.

    Values are read as YAML (numbers, true/false, null, [lists], {mappings}); the commas that
    separate KEY=VALUE pairs are those outside brackets and quotes.
    """
    import yaml

    out = {}
    for item in _split_top_level(text or ""):
        if "=" not in item:
            raise UsageError(f"--model-kwargs takes KEY=VALUE pairs separated by commas "
                             f"(e.g. dims=[32,64,128,160,256],drop_rate=0.1), got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise UsageError(f"--model-kwargs: {key!r} is not an argument name (in {item!r})")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise UsageError(f"--model-kwargs: the value of {key} ({value.strip()!r}) cannot be read ({problem}); "
                             "write lists as [a,b,c], mappings as {k: v}, text with commas in quotes") from None
    return out
