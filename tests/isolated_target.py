"""An object for :mod:`airflow_provider_cxpg.output.isolated`'s tests, built in the child process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Echo:
    def __init__(self, *, steps: Callable[[str, float | None], None], greeting: str = "hi") -> None:
        self._steps = steps
        self.greeting = greeting

    def ident(self, value: Any) -> Any:
        return value

    def size(self, payload: bytes) -> int:
        return len(payload)

    def slow(self, seconds: float, step_timeout: float | None = None) -> str:
        self._steps("sleeping", step_timeout)
        time.sleep(seconds)
        return "slept"

    def fail(self, text: str) -> None:
        raise RuntimeError(text)
