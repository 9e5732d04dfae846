"""The one line per goal every bench ends with."""


def goal(name: str, value: float, op: str, target: float) -> None:
    met = value >= target if op == ">=" else value <= target
    print(f"goal: {name} {value:.2f} (target {op} {target:g}) {'met' if met else 'missed'}")
