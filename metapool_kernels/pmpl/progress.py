"""Progress of a training loop: a live bar on a terminal, a plain line every few steps in a log.

A tqdm bar redraws itself with carriage returns many times a second; written into a file (CI, or
``make demo > log``) that is thousands of frames per epoch. So the bar is drawn only when both
stdout and stderr (where tqdm draws) are terminals; otherwise :class:`StepLines` prints one line
every ``every`` steps, and the trainers print their usual line per epoch.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional

LOG_EVERY_STEPS = 100


def is_terminal() -> bool:
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


class StepLines:
    """The part of tqdm's interface the trainers use, printing ``desc: step i/n postfix (t s)``."""

    def __init__(self, iterable: Iterable, desc: str, every: int = LOG_EVERY_STEPS):
        self.iterable = iterable
        self.desc = desc
        self.every = max(1, every)
        self.postfix = ""
        try:
            self.total: Optional[int] = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            self.total = None

    def __iter__(self):
        start = time.perf_counter()
        for i, item in enumerate(self.iterable, 1):
            yield item
            # The last step is left to the caller's per-epoch line.
            if i % self.every == 0 and i != self.total:
                of = f"/{self.total}" if self.total is not None else ""
                print(f"  {self.desc}: step {i}{of} {self.postfix} ({time.perf_counter() - start:.0f} s)".rstrip(),
                      flush=True)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass


class _Silent(StepLines):
    def __iter__(self):
        return iter(self.iterable)


def progress(iterable: Iterable, desc: str, enabled: bool = True, every: Optional[int] = LOG_EVERY_STEPS):
    """A tqdm bar on a terminal; in a log :class:`StepLines` (or nothing with ``every=None``, for
    short loops such as an evaluation); nothing at all when ``enabled`` is False."""
    if not enabled:
        return _Silent(iterable, desc)
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)
    return _Silent(iterable, desc) if every is None else StepLines(iterable, desc, every)
