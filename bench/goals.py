"""Whether a bench goal is met; every bench ends with one `goal: ...` line per goal."""

OPS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "==": lambda v, t: v == t}


def verdict(value: float, op: str, target: float) -> str:
    return "met" if OPS[op](value, target) else "missed"
