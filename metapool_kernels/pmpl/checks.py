"""What a valid setting is, said once for the two places settings enter: the run configs (the Python
API and the configs stored in checkpoints) and the command line (whose errors name the flag)."""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict


@dataclass(frozen=True)
class Rule:
    expected: str                  # what a valid value is, as the error message says it
    accepts: Callable[[Any], bool]

    def check(self, name: str, value: Any) -> None:
        if not self.accepts(value):
            raise ValueError(f"{name} must be {self.expected}, got {value!r}")

    def optional(self) -> "Rule":
        return Rule(f"None or {self.expected}", lambda v: v is None or self.accepts(v))

    def arg(self, parse: Callable[[str], Any] = float) -> Callable[[str], Any]:
        """An argparse ``type``: parse the flag's text, then apply this rule."""
        def convert(text: str) -> Any:
            try:
                value = parse(text)
            except ValueError:
                value = text
            if not self.accepts(value):
                raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}")
            return value
        return convert


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """A finite int or float (NaN and ±inf are not settings)."""
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


POSITIVE = Rule("a positive finite number", lambda v: is_real(v) and v > 0)
NON_NEGATIVE = Rule("a finite number >= 0", lambda v: is_real(v) and v >= 0)
BELOW_ONE = Rule("a number in [0, 1)", lambda v: is_real(v) and 0 <= v < 1)
OPEN_UNIT = Rule("a number strictly between 0 and 1", lambda v: is_real(v) and 0 < v < 1)
UP_TO_ONE = Rule("a number in (0, 1]", lambda v: is_real(v) and 0 < v <= 1)
POSITIVE_INT = Rule("a positive integer", lambda v: is_int(v) and v >= 1)
NON_NEGATIVE_INT = Rule("an integer >= 0", lambda v: is_int(v) and v >= 0)
SEED = Rule("an integer in [0, 2**63)", lambda v: is_int(v) and 0 <= v < 2 ** 63)
FLAG = Rule("True or False", lambda v: isinstance(v, bool))
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and v != "")
PATH = Rule("a path (a non-empty string or os.PathLike)", lambda v: isinstance(v, (str, os.PathLike)) and str(v) != "")
# The package's kernels run on CPU and CUDA tensors only.
DEVICE = Rule("'auto', 'cpu', 'cuda' or 'cuda:N'",
              lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", v) is not None)


def check_fields(obj: Any, rules: Dict[str, Rule]) -> None:
    """Apply each field's rule; paths become strings (a config is stored as plain values)."""
    for name, rule in rules.items():
        value = getattr(obj, name)
        rule.check(name, value)
        if isinstance(value, os.PathLike):
            setattr(obj, name, os.fspath(value))
