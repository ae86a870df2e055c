"""Progress of long loops: a tqdm bar on a terminal, plain periodic log lines anywhere else.

The one rule, used by every loop of ours that reports progress (training steps, scoring, tokenizing,
near-duplicate search): a bar only when stderr is a terminal (:func:`bars_wanted`); redirected to a file
or a pipe, a bar's ``\\r`` redraws would pile up into one long line, so the loop logs a line at INFO instead
every ``every_fraction`` of the work and every ``every_s`` seconds; with the ``lora_dapt`` logger above
INFO (``lora-dapt -q``) there is neither. Bars of the libraries we call (transformers' weight loading and
GGUF dequantization) follow the same rule: :func:`library_bars_off` turns off the ones a switch controls,
:func:`foreign_bars_hidden` drops the redraws of the others while a call runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO, TypeVar

log = logging.getLogger("lora_dapt")

T = TypeVar("T")


def quiet() -> bool:
    """True when the ``lora_dapt`` logger is set above INFO (``lora-dapt -q`` sets WARNING): no bars and no
    progress lines. A logger left unset (NOTSET, as in a plain Python session) is not quiet."""
    return log.level > logging.INFO


def bars_wanted(stream: TextIO | None = None) -> bool:
    """The rule: a progress bar when ``stream`` (default stderr) is a terminal and output is not quiet."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not quiet()


class Progress:
    """One loop's progress: a tqdm bar (:func:`bars_wanted`), else INFO lines such as
    ``training: 3/10 step (30%), loss=2.31, 12s`` every ``every_fraction`` of ``total`` (None: never by
    fraction) and every ``every_s`` seconds; nothing when quiet or ``disable``.

    Use it as tqdm's bar is used: ``update(n)``, ``set_postfix(key=value)``, ``close()`` or a ``with``
    block; ``n`` is the count done so far.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "it",
        initial: int = 0,
        unit_scale: bool = False,
        leave: bool = True,
        every_fraction: float | None = 0.1,
        every_s: float | None = 60.0,
        disable: bool = False,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.every_fraction, self.every_s = every_fraction, every_s
        self._postfix = ""
        self._bar: Any = None
        self._lines = False
        self._start = self._last_t = time.monotonic()
        self._last_n = initial
        if disable or quiet():
            return
        if bars_wanted():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                unit_scale=unit_scale,
                leave=leave,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        else:
            self._lines = True

    def update(self, k: int = 1) -> None:
        """``k`` more done."""
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
        elif self._lines and self._due():
            self._log_line()

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the count (``loss=2.31``); None values are left out."""
        shown = {k: v for k, v in values.items() if v is not None}
        self._postfix = "".join(f", {k}={v}" for k, v in shown.items())
        if self._bar is not None:
            self._bar.set_postfix(shown)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _due(self) -> bool:
        now = time.monotonic()
        if self.every_s is not None and now - self._last_t >= self.every_s:
            return True
        if self.every_fraction and self.total > 0:
            step = self.every_fraction * self.total
            return int(self.n / step) > int(self._last_n / step)
        return False

    def _log_line(self) -> None:
        self._last_t, self._last_n = time.monotonic(), self.n
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        elapsed = self._last_t - self._start
        log.info(
            "%s: %s/%s %s%s%s, %.0fs",
            self.desc,
            f"{self.n:,}",
            f"{self.total:,}",
            self.unit,
            pct,
            self._postfix,
            elapsed,
        )


def progress(total: int, desc: str, **kwargs: Any) -> Progress:
    """A :class:`Progress` for ``total`` units of work (keyword arguments as :class:`Progress`)."""
    return Progress(total, desc, **kwargs)


def track(items: Sequence[T], desc: str, **kwargs: Any) -> Iterator[T]:
    """The items of ``items``, one by one, with a :class:`Progress` over them (``for x in track(xs, "docs")``)."""
    with Progress(len(items), desc, **kwargs) as bar:
        for item in items:
            yield item
            bar.update()


class _DropRedraws:
    """A text stream that passes everything to ``stream`` except progress-bar redraws (writes holding a
    ``\\r``) and the bare newline that ends a bar; warnings and other messages pass unchanged."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.dropped = False

    def write(self, text: str) -> int:
        if "\r" in text or (self.dropped and not text.strip()):
            self.dropped = True
            return len(text)
        self.dropped = False
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ... of the real stream
        return getattr(self.stream, name)


@contextlib.contextmanager
def foreign_bars_hidden() -> Iterator[None]:
    """While the block runs, drop the redraws of progress bars that other libraries draw with no switch of
    theirs (transformers' GGUF dequantization), unless :func:`bars_wanted`. Other writes to stderr pass."""
    if bars_wanted():
        yield
        return
    with contextlib.redirect_stderr(_DropRedraws(sys.stderr)):
        yield


_LIBRARY_SWITCHES = (
    ("huggingface_hub.utils", "disable_progress_bars"),
    ("transformers.utils.logging", "disable_progress_bar"),
    ("datasets.utils.tqdm", "disable_progress_bars"),
)
"""The libraries' own progress-bar switches (module, function), for :func:`library_bars_off`."""


def library_bars_off() -> None:
    """Turn off the bars of huggingface_hub, transformers and datasets (weight loading, shard writing,
    ``Dataset.map``) through their own switches, for the rest of the process: what the command line does
    when :func:`bars_wanted` is False. A library not imported yet reads the environment variables set here
    when it is."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    for module, switch in _LIBRARY_SWITCHES:
        if module in sys.modules:
            getattr(sys.modules[module], switch)()
