"""A real terminal for tests and screenshots: a command in a tmux server of its own (a pseudo-terminal
and a terminal emulator), whose screen is read as text or with its colours, and which is sent keys.

Each :class:`Terminal` runs its own tmux server (``-L``, a socket of its own; no user config; no
status line), so the screen is exactly what the command drew; the command's exit status is kept.
Whoever starts one closes it. :func:`html` renders a screen
read with colours as an HTML page, which a browser turns into a picture (``docs/top.png``).
"""

from __future__ import annotations

import html as escape
import re
import secrets
import shlex
import subprocess
import tempfile
from pathlib import Path

_CONFIG = "set -g status off\nset -g remain-on-exit on\nset -g default-terminal screen-256color\n"


class Terminal:
    """``argv`` running in a ``width`` x ``height`` terminal, with ``env`` (see the module docstring)."""

    def __init__(self, argv: list[str], env: dict[str, str], *, width: int = 120, height: int = 40) -> None:
        self._argv = argv
        self._env = {k: v for k, v in env.items() if k != "TMUX"}  # never the caller's own tmux
        self._size = (width, height)
        self._socket = f"tailgate-{secrets.token_hex(4)}"
        self._dir = tempfile.TemporaryDirectory(prefix="tailgate-tmux-")
        self._config = Path(self._dir.name) / "tmux.conf"
        self._config.write_text(_CONFIG)
        self._status = Path(self._dir.name) / "status"

    def _tmux(self, *args: str) -> str:
        argv = ["tmux", "-L", self._socket, "-f", str(self._config), *args]
        done = subprocess.run(argv, env=self._env, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def start(self) -> Terminal:
        width, height = (str(n) for n in self._size)
        # A shell waits for the command and writes its exit status down: tmux 3.3 may leave an exited
        # command unreaped, its pane never marked dead. `trap : INT` keeps the shell itself alive
        # through a Ctrl-C, which the command (a handler is not inherited, unlike SIG_IGN) still gets.
        script = 'trap : INT; "$@"; echo $? > "$0"'
        command = shlex.join(["sh", "-c", script, str(self._status), *self._argv])
        self._tmux("new-session", "-d", "-s", "main", "-x", width, "-y", height, command)
        return self

    def screen(self, *, colours: bool = False) -> str:
        """What the terminal shows now, a line per row; with ``colours``, with its SGR escapes."""
        return self._tmux("capture-pane", "-p", "-t", "main", *(["-e"] if colours else []))

    def send(self, *keys: str) -> None:
        """Keys as tmux names them: ``"q"``, ``"C-c"``, ``"Enter"``."""
        self._tmux("send-keys", "-t", "main", *keys)

    def exit_status(self) -> int | None:
        """The command's exit status once it has exited, else ``None``."""
        written = self._status.read_text().strip() if self._status.exists() else ""
        return int(written) if written else None

    def close(self) -> None:
        try:
            self._tmux("kill-server")
        except RuntimeError:
            pass  # the server had exited (its only session ended)
        self._dir.cleanup()

    def __enter__(self) -> Terminal:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()


# The 16 ANSI colours as xterm draws them (indexes 0-15).
_PALETTE = [
    "#000000", "#cd0000", "#00cd00", "#cdcd00", "#0000ee", "#cd00cd", "#00cdcd", "#e5e5e5",
    "#7f7f7f", "#ff0000", "#00ff00", "#ffff00", "#5c5cff", "#ff00ff", "#00ffff", "#ffffff",
]  # fmt: skip
_SGR = re.compile(r"\x1b\[([0-9;]*)m")
_FG, _BG = "#e5e5e5", "#1e1e1e"


def html(screen: str, *, title: str = "terminal") -> str:
    """A page showing ``screen`` (read with colours) as a dark terminal does: SGR bold, underline,
    reverse and the 16 colours (256-colour indexes below 16 too); other escapes are dropped."""
    out: list[str] = []
    style: dict[str, object] = {}
    for line in screen.rstrip("\n").split("\n"):
        pos = 0
        for m in [*_SGR.finditer(line), None]:
            text = line[pos : m.start() if m else len(line)]
            if text:
                out.append(_span(text, style))
            if m is None:
                break
            _apply(style, [int(c) if c else 0 for c in m.group(1).split(";")])
            pos = m.end()
        out.append("\n")
    body = "".join(out)
    return (
        f"<!doctype html><meta charset=utf-8><title>{escape.escape(title)}</title>"
        f"<style>body{{margin:0;background:{_BG}}}pre{{margin:0;padding:14px 16px;color:{_FG};"
        "font:14px/1.35 'DejaVu Sans Mono',monospace;display:inline-block}</style>"
        f"<pre>{body}</pre>"
    )


def _apply(style: dict[str, object], codes: list[int]) -> None:
    i = 0
    while i < len(codes):
        c = codes[i]
        if c == 0:
            style.clear()
        elif c in (1, 4, 7):
            style[str(c)] = True
        elif c in (22, 24, 27):
            style.pop(str(c - 20 if c != 22 else 1), None)
        elif 30 <= c <= 37 or 90 <= c <= 97:
            style["fg"] = _PALETTE[c - 30 if c < 90 else c - 82]
        elif 40 <= c <= 47 or 100 <= c <= 107:
            style["bg"] = _PALETTE[c - 40 if c < 100 else c - 92]
        elif c in (38, 48) and codes[i + 1 : i + 2] == [5] and i + 2 < len(codes):
            if codes[i + 2] < 16:
                style["fg" if c == 38 else "bg"] = _PALETTE[codes[i + 2]]
            i += 2
        elif c in (39, 49):
            style.pop("fg" if c == 39 else "bg", None)
        i += 1


def _span(text: str, style: dict[str, object]) -> str:
    fg, bg = str(style.get("fg", _FG)), str(style.get("bg", _BG))
    if style.get("7"):
        fg, bg = bg, fg
    css = [f"color:{fg}"] if fg != _FG else []
    css += [f"background:{bg}"] if bg != _BG else []
    css += ["font-weight:bold"] if style.get("1") else []
    css += ["text-decoration:underline"] if style.get("4") else []
    safe = escape.escape(text)
    return f'<span style="{";".join(css)}">{safe}</span>' if css else safe
