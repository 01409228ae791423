"""A progress bar over the runs: tqdm when installed, else a small text bar on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total = max(1, int(total))
        self.n = 0
        self.desc = ""
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._tqdm = None
        self._t0 = time.perf_counter()
        self._last_line = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if enabled:
            try:
                from tqdm import tqdm  # optional
                self._tqdm = tqdm(total=self.total, file=self.stream, leave=False, dynamic_ncols=True,
                                  bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
            except Exception:  # noqa: BLE001
                self._tqdm = None

    def set(self, desc: str) -> None:
        self.desc = desc
        if self._tqdm is not None:
            self._tqdm.set_description_str(desc, refresh=True)
        else:
            self._draw()

    def add_total(self, k: int) -> None:
        self.total += k
        if self._tqdm is not None:
            self._tqdm.total = self.total
            self._tqdm.refresh()

    def update(self, k: int = 1) -> None:
        self.n = min(self.total, self.n + k)
        if self._tqdm is not None:
            self._tqdm.update(k)
        else:
            self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self._tty and not force and now - self._last_line < 5.0:
            return  # a pipe or CI log: one line every few seconds at most
        self._last_line = now
        width = 24
        done = int(width * self.n / self.total)
        bar = "#" * done + "-" * (width - done)
        elapsed = now - self._t0
        line = f"[{bar}] {self.n}/{self.total} {elapsed:5.0f}s  {self.desc}"
        if self._tty:
            self.stream.write("\r" + line[:150].ljust(150)[:150].rstrip() + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def write(self, msg: str) -> None:
        """Print a line without breaking the bar."""
        if self._tqdm is not None:
            self._tqdm.write(msg, file=self.stream)
        else:
            if self.enabled and self._tty:
                self.stream.write("\r\x1b[K")
            self.stream.write(msg + "\n")
            self.stream.flush()
            self._draw(force=self._tty)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled and self._tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
