"""The shell: runs command lines (interactive prompt, script, pipe) against a Client."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, TextIO

from . import commands as C
from .client import BadTarget, Client, ClientError, parse_servers
from .completer import KVSCompleter
from .parser import ParseError, split_commands
from .render import Renderer
from .views import StreamView

HISTORY_ENV = "KVS_SHELL_HISTORY"


def history_path() -> Path:
    return Path(os.environ.get(HISTORY_ENV) or Path.home() / ".kvs_shell_history")


def private_history(path: Path) -> Path:
    """Create the history file 0600, or make an existing one 0600: it holds values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return path


class Shell:
    """State of one shell: the client, output settings, and the completer's caches."""

    def __init__(self, servers: list[str], fmt: str = "table", timeout: float = 5.0,
                 interactive: bool = False, out: TextIO | None = None,
                 err: TextIO | None = None, color: bool | None = None,
                 continue_on_error: bool = False, default_host: str = "127.0.0.1",
                 width: int | None = None, consistency: str = "local"):
        self.default_host = default_host
        self.timeout = timeout
        self.client = Client(servers, timeout=timeout, consistency=consistency)
        self.renderer = Renderer(fmt, out=out, err=err, color=color, interactive=interactive,
                                 width=width)
        self.interactive = interactive
        self.continue_on_error = continue_on_error or interactive
        self.timing = False
        self.completer = KVSCompleter(lambda: self.client)
        self.failed = 0
        self.exit_requested = False
        self.last_latency: float | None = None
        self.last_ok: bool | None = None
        self.session = None
        self._written: list[str] = []
        self.identity = None  # client.Identity once the server told us (whoami)

    # -- Context for the command handlers --------------------------------------
    def connect(self, spec: str) -> str:
        try:
            servers = parse_servers(spec, self.default_host)
            new = Client(servers, timeout=self.timeout, consistency=self.client.consistency)
        except BadTarget as exc:
            raise C.UsageError(str(exc)) from None
        old, self.client = self.client, new
        old.close()
        self.identity = None
        self.completer.reset()
        ready = new.wait_ready(timeout=min(2.0, self.timeout))
        where = ",".join(servers)
        mode = " (round robin with failover)" if len(servers) > 1 else ""
        return (f"connected to {where}{mode}" if ready
                else f"switched to {where}{mode}, but no server answers yet")

    def wrote(self, keys) -> None:
        """Keys a command wrote; None: unknown ones (import, compact, retention)."""
        self._written = None if keys is None else list(keys)

    def progress(self, label: str, unit: str):
        """A progress callback for a long run (a bar when stdout is a terminal)."""
        return self.renderer.progress(label, unit)

    def request_exit(self) -> None:
        self.exit_requested = True

    def identified(self, identity) -> None:
        self.identity = identity

    def saw_nodes(self, nodes) -> None:
        self.completer.saw_nodes(nodes)

    def security_text(self) -> str:
        """``TLS · admin [admin] via cert`` / ``plaintext, no credentials · ...``: the
        connection's protection and who the server takes us for (if known yet)."""
        text = self.client.security.describe()
        if self.identity is not None:
            text += f" · {self.identity.label()}"
        return text

    def ask_identity(self) -> str:
        """Asks the server who we are (for the banner); '' or why it could not tell."""
        try:
            self.identified(self.client.whoami(timeout=min(2.0, self.timeout)))
        except ClientError as exc:
            return str(exc)
        return ""

    # -- running commands -----------------------------------------------------
    def run_words(self, words: list[str], where: str = "") -> bool:
        """Run one command; render its result or error. True if it succeeded."""
        self._written: list[str] | None = []
        started = time.perf_counter()
        ok = False
        view = None
        try:
            view = C.run(self, words)
            self.renderer.render(view)  # a StreamView runs on while it is rendered
        except C.UsageError as exc:
            self.renderer.error(where + str(exc))
        except ClientError as exc:
            self.renderer.error(where + str(exc))
        except KeyboardInterrupt:
            if isinstance(view, StreamView):  # Ctrl-C ends a watch: not a failure
                close = getattr(view.items, "close", None)
                if close is not None:
                    close()
                ok = view.ok
                if not self.interactive:
                    self.exit_requested = True  # a signal ends the script too
            else:
                self.renderer.error(where + "interrupted")
        else:
            ok = view.ok
            if not ok:
                self.renderer.error(where + view.error)
        self.last_latency = time.perf_counter() - started
        self.last_ok = ok
        if self._written is None:  # which keys is not known: everything is due again
            self.completer.wrote(None)
        elif self._written:
            added = []
            if ok and words and C.lookup(words[0]) and C.lookup(words[0]).name in ("put", "mput"):
                added = self._written
            self.completer.wrote(self._written, added)
        if self.timing:
            self.renderer.timing(self.last_latency, self.client.last_peer)
        if not ok:
            self.failed += 1
        return ok

    def run_line(self, line: str, where: str = "") -> bool:
        """Run every command of a line. False if one failed (and the rest were skipped
        unless errors do not stop: interactive or --continue-on-error)."""
        try:
            cmds = split_commands(line)
        except ParseError as exc:
            self.renderer.error(where + str(exc))
            self.failed += 1
            return False
        all_ok = True
        for words in cmds:
            ok = self.run_words(words, where)
            all_ok = all_ok and ok
            if self.exit_requested or (not ok and not self.continue_on_error):
                break
        return all_ok

    def run_lines(self, lines: Iterable[str], name: str = "") -> int:
        """Script / pipe mode. Exit status: 1 if any command failed, else 0."""
        for n, line in enumerate(lines, 1):
            where = f"{name}:{n}: " if name else ""
            ok = self.run_line(line.rstrip("\n"), where)
            if self.exit_requested or (not ok and not self.continue_on_error):
                break
        return 1 if self.failed else 0

    def close(self) -> None:
        self.completer.close()
        self.client.close()

    # -- interactive ----------------------------------------------------------
    def toolbar(self):
        state = self.client.state
        cls = {"connected": "class:bottom-toolbar.ok", "down": "class:bottom-toolbar.bad",
               "closed": "class:bottom-toolbar.bad"}.get(state, "class:bottom-toolbar.warn")
        sec = self.client.security
        parts = [("class:bottom-toolbar", f" server {self.client.label} "),
                 (cls, f"● {state} "),
                 ("class:bottom-toolbar", "│ "),
                 ("class:bottom-toolbar.ok" if sec.tls else "class:bottom-toolbar.warn",
                  "TLS " if sec.tls else "plaintext "),
                 ("class:bottom-toolbar",
                  f"{self.identity.label()} " if self.identity is not None
                  else ("(credentials sent, identity not checked) " if sec.token or sec.tls_cert
                        else "(no credentials) "))]
        if self.last_latency is not None:
            peer = f" via {self.client.last_peer}" if self.client.last_peer else ""
            parts.append(("class:bottom-toolbar",
                          f"│ last {self.last_latency * 1000:.1f} ms{peer} "))
        level = self.client.consistency
        parts.append(("class:bottom-toolbar", "│ reads "))
        parts.append(("class:bottom-toolbar.ok" if level == "linearizable"
                      else "class:bottom-toolbar", f"{level} "))
        parts.append(("class:bottom-toolbar",
                      f"│ timing {'on' if self.timing else 'off'} │ TAB complete · Ctrl-R search · "
                      "Ctrl-D exit "))
        return parts

    def make_session(self, input=None, output=None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.completion import ThreadedCompleter
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        from .lexer import STYLE, KVSLexer

        kb = KeyBindings()

        @kb.add("c-c")
        def _clear(event):  # Ctrl-C clears the line (and any completion menu)
            event.app.current_buffer.reset()

        path = history_path()
        try:
            history = FileHistory(str(private_history(path)))
        except OSError:
            history = InMemoryHistory()
        self.session = PromptSession(
            message=[("class:kvs.command", "kvs"), ("", "> ")],
            history=history, auto_suggest=AutoSuggestFromHistory(),
            completer=ThreadedCompleter(self.completer), complete_while_typing=True,
            lexer=KVSLexer(), style=STYLE, bottom_toolbar=self.toolbar, key_bindings=kb,
            refresh_interval=0.5, input=input, output=output, include_default_pygments_style=False,
        )
        return self.session

    def banner(self) -> None:
        from rich.text import Text
        why = self.ask_identity()
        tls = self.client.security.tls
        self.renderer.out.print(Text.assemble(
            ("KVS shell", "bold"), f" — {self.client.label}  ",
            ("help", "cyan"), " lists commands, TAB completes, Ctrl-R searches history, ",
            ("Ctrl-D", "cyan"), " exits."))
        self.renderer.out.print(Text.assemble(
            ("connection: ", "bold"), ("TLS" if tls else "plaintext", "green" if tls else "bold red"),
            self.security_text()[len("TLS" if tls else "plaintext"):],
            *(((f"  (identity unknown: {why})", "yellow"),) if why else ())))

    def run_interactive(self, input=None, output=None, banner: bool = True) -> int:
        session = self.session or self.make_session(input, output)
        if banner:
            self.banner()
        while not self.exit_requested:
            try:
                line = session.prompt()
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if line.strip():
                self.run_line(line)
        return 0
