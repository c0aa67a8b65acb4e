"""Splitting a shell line into commands and words.

Rules (a small subset of POSIX shell, like psql/redis-cli):
- words are separated by blanks;
- ``'single quotes'`` keep everything literally;
- ``"double quotes"`` allow the escapes ``\\"`` ``\\\\`` ``\\n`` ``\\t``;
- outside quotes a backslash escapes the next character (``a\\ b`` is one word);
- ``;`` outside quotes ends a command (``put k1 v1; get k1``);
- ``#`` at the start of a word starts a comment that runs to the end of the line.

:func:`tokenize` keeps the positions of every token, for the lexer and the
completer; ``strict=False`` accepts an unterminated quote (the user is still
typing) instead of raising :class:`ParseError`.
"""
from __future__ import annotations

from dataclasses import dataclass

WORD, SEP, COMMENT = "word", "sep", "comment"
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


class ParseError(ValueError):
    """A line that cannot be split (unterminated quote)."""


@dataclass
class Token:
    kind: str
    text: str  # the word with quotes removed and escapes applied
    start: int  # offsets in the raw line: line[start:end] is the raw token
    end: int
    quoted: bool = False
    closed: bool = True  # False: an unterminated quote (only with strict=False)


def tokenize(line: str, strict: bool = True) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in " \t\r\n":
            i += 1
            continue
        if c == ";":
            tokens.append(Token(SEP, ";", i, i + 1))
            i += 1
            continue
        if c == "#":
            tokens.append(Token(COMMENT, line[i:], i, n))
            break
        start = i
        buf: list[str] = []
        quoted = False
        closed = True
        while i < n and line[i] not in " \t\r\n;":
            c = line[i]
            if c == "'":
                quoted = True
                j = line.find("'", i + 1)
                if j < 0:
                    if strict:
                        raise ParseError(f"unterminated ' quote at column {i + 1}")
                    buf.append(line[i + 1:])
                    i, closed = n, False
                    break
                buf.append(line[i + 1:j])
                i = j + 1
            elif c == '"':
                quoted = True
                i += 1
                while i < n and line[i] != '"':
                    if line[i] == "\\" and i + 1 < n:
                        buf.append(_ESCAPES.get(line[i + 1], "\\" + line[i + 1]))
                        i += 2
                    else:
                        buf.append(line[i])
                        i += 1
                if i >= n:
                    if strict:
                        raise ParseError(f'unterminated " quote at column {start + 1}')
                    closed = False
                    break
                i += 1
            elif c == "\\" and i + 1 < n:
                buf.append(line[i + 1])
                i += 2
            else:
                buf.append(c)
                i += 1
        tokens.append(Token(WORD, "".join(buf), start, i, quoted, closed))
    return tokens


def split_commands(line: str) -> list[list[str]]:
    """``'put k "a b"; get k # note'`` -> ``[['put', 'k', 'a b'], ['get', 'k']]``."""
    commands: list[list[str]] = []
    current: list[str] = []
    for tok in tokenize(line, strict=True):
        if tok.kind == WORD:
            current.append(tok.text)
        elif tok.kind == SEP:
            if current:
                commands.append(current)
            current = []
    if current:
        commands.append(current)
    return commands


def current_command(text: str) -> tuple[list[Token] | None, bool]:
    """For completion: the word tokens of the command the cursor is in, and whether
    the cursor starts a new (empty) word.  ``text`` is the line up to the cursor;
    ``None`` when the cursor is inside a comment."""
    tokens = tokenize(text, strict=False)
    words: list[Token] = []
    for tok in tokens:
        if tok.kind == SEP:
            words = []
        elif tok.kind == WORD:
            words.append(tok)
        elif tok.kind == COMMENT:
            return None, False  # inside a comment: nothing to complete
    new_word = not words or words[-1].end < len(text) or (
        bool(text) and text[-1] in " \t" and words[-1].closed)
    if words and not words[-1].closed:
        new_word = False
    if tokens and tokens[-1].kind == SEP and tokens[-1].end == len(text):
        new_word = True
    return words, new_word


def quote(word: str) -> str:
    """Quote ``word`` so that :func:`tokenize` reads it back unchanged."""
    if word and not any(c in word for c in " \t\r\n;#'\"\\"):
        return word
    if "'" not in word and "\n" not in word and "\t" not in word:
        return f"'{word}'"
    body = word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{body}"'
