"""Syntax highlighting of the input line (prompt_toolkit Lexer).

Known commands are bold green, unknown ones red; keys, values and versions get
their own colours by the command's argument kinds; `;` and comments are dim.
"""
from __future__ import annotations

from prompt_toolkit.document import Document
from prompt_toolkit.lexers import Lexer
from prompt_toolkit.styles import Style

from . import commands as C
from .parser import COMMENT, SEP, tokenize

STYLE = Style.from_dict({
    "kvs.command": "bold ansigreen",
    "kvs.unknown": "bold ansired",
    "kvs.key": "ansicyan",
    "kvs.value": "ansiyellow",
    "kvs.version": "ansimagenta",
    "kvs.bad": "underline ansired",
    "kvs.arg": "",
    "kvs.option": "ansiblue",
    "kvs.sep": "bold ansiblue",
    "kvs.comment": "italic ansibrightblack",
    "kvs.space": "",
    "bottom-toolbar": "noreverse bg:#222222 #aaaaaa",
    "bottom-toolbar.ok": "bg:#222222 ansigreen",
    "bottom-toolbar.bad": "bg:#222222 ansired",
    "bottom-toolbar.warn": "bg:#222222 ansiyellow",
})

_KIND_STYLE = {C.KEY: "class:kvs.key", C.PREFIX: "class:kvs.key", C.KEYVER: "class:kvs.key",
               C.VALUE: "class:kvs.value", C.VERSION: "class:kvs.version",
               C.OPTION: "class:kvs.option", C.COUNT: "class:kvs.version",
               C.TIME: "class:kvs.value", C.POSITION: "class:kvs.version",
               C.KEEP: "class:kvs.version", C.FILE: "class:kvs.value"}


def highlight(line: str) -> list[tuple[str, str]]:
    """Style fragments for one line."""
    frags: list[tuple[str, str]] = []
    pos = 0
    cmd = None
    arg_index = -1
    arg_words: list[str] = []
    for tok in tokenize(line, strict=False):
        if tok.start > pos:
            frags.append(("", line[pos:tok.start]))
        raw = line[tok.start:tok.end]
        if tok.kind == SEP:
            style, cmd, arg_index, arg_words = "class:kvs.sep", None, -1, []
        elif tok.kind == COMMENT:
            style = "class:kvs.comment"
        elif arg_index < 0:
            cmd = C.lookup(tok.text)
            style = "class:kvs.command" if cmd else "class:kvs.unknown"
            arg_index = 0
        else:
            arg_words.append(tok.text)
            kind = C.word_kinds(cmd, arg_words)[-1] if cmd else None
            style = _KIND_STYLE.get(kind or "", "class:kvs.arg")
            if kind in (C.KEY, C.KEYVER) and len(tok.text.rpartition("@")[0]
                                                 if kind == C.KEYVER and "@" in tok.text
                                                 else tok.text) < C.MIN_LEN:
                style += " class:kvs.bad"
            elif kind in (C.VERSION, C.COUNT, C.POSITION, C.KEEP) and not tok.text.isdigit():
                style += " class:kvs.bad"
            elif kind == C.OPTION and cmd.option(tok.text.partition("=")[0]) is None:
                style += " class:kvs.bad"
            elif C.choices(kind) and tok.text.lower() not in C.choices(kind):
                style += " class:kvs.bad"
            arg_index += 1
        frags.append((style, raw))
        pos = tok.end
    if pos < len(line):
        frags.append(("", line[pos:]))
    return frags


class KVSLexer(Lexer):
    def lex_document(self, document: Document):
        lines = document.lines
        cache: dict[int, list] = {}

        def get_line(i: int):
            if i not in cache:
                cache[i] = highlight(lines[i]) if i < len(lines) else []
            return cache[i]

        return get_line
