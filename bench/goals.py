"""Whether a bench goal is met; every bench ends with one `goal: ...` line per goal."""


def verdict(value: float, op: str, target: float) -> str:
    return "met" if (value >= target if op == ">=" else value <= target) else "missed"
