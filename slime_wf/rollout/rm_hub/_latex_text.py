"""LaTeX -> plain text, reproducing ``pylatexenc`` 2.10's ``LatexNodes2Text`` defaults.

The PRM800K-style sympy grader in :mod:`.math_utils` pipes normalized answers through
``LatexNodes2Text().latex_to_text`` before handing them to sympy.  The text it produces is
load-bearing: ``\\frac{2}{4}`` must become ``2/4`` (so the unreduced-fraction guard sees a
plain ``a/b``), unknown macros vanish, ``\\sqrt`` becomes ``√(..)`` and so on.  To keep rewards
identical without the dependency, this module re-implements the subset of that behaviour that
shows up in math answers: tolerant tokenizing and argument parsing (one-token arguments,
missing arguments, stray braces), macros and their argument specs, specials, ``\\(..\\)`` /
``\\[..\\]`` math, and matrix / equation environments.

Input is assumed to contain no ``$`` or ``%`` (the caller strips them first).  Macros missing
from :mod:`._latex_tables` render as the empty string, like macros ``pylatexenc`` does not know.
Failures that ``pylatexenc`` raises on (e.g. ``\\sqrt`` without an argument, an empty matrix)
raise here too, so callers can fall back the same way.
"""

from __future__ import annotations

import re
import unicodedata

from ._latex_tables import (
    CENTERED_ENVS,
    ENV_ARGS,
    EQUATION_ENVS,
    MACROS,
    MATRIX_ENVS,
    SPECIALS,
    SPECIALS_BY_LENGTH,
    STYLE_HOLES,
    STYLE_OFFSETS,
)

__all__ = ["latex_to_text"]

_ENV_NAME = re.compile(r"\s*\{([\w* ._-]+)\}")
_PERCENT_S = re.compile(r"(^|[^%])(%%)*%s")
_MATH_CLOSERS = ("\\)", "\\]")


class _EndOfInput(Exception):
    def __init__(self, final_space: str = "") -> None:
        super().__init__()
        self.final_space = final_space


class _Tok:
    __slots__ = ("kind", "arg", "start", "end", "pre", "post")

    def __init__(self, kind: str, arg: str, start: int, end: int, pre: str, post: str = "") -> None:
        self.kind, self.arg, self.start, self.end, self.pre, self.post = kind, arg, start, end, pre, post


# Nodes are tuples: ("chars", text) | ("group", nodes) | ("macro", name, args | None, post_space)
# | ("specials", chars) | ("math", display, nodes) | ("env", name, nodes).


class _Parser:
    def __init__(self, s: str) -> None:
        self.s = s

    def token(self, pos: int, brackets: bool = False, environments: bool = True) -> _Tok:
        s, n, start = self.s, len(self.s), pos
        while pos < n and s[pos].isspace():
            pos += 1
            if pos - start >= 2 and s[pos - 2 : pos] == "\n\n":
                return _Tok("char", "\n\n", pos - 2, pos, s[start : pos - 2])
        pre = s[start:pos]
        if pos >= n:
            raise _EndOfInput(pre)
        ch = s[pos]
        if ch == "\\":
            if pos + 1 >= n:
                raise _EndOfInput()
            end = pos + 2
            alpha = s[pos + 1].isalpha()
            if alpha:
                while end < n and s[end].isalpha():
                    end += 1
            name = s[pos + 1 : end]
            if name in ("(", ")", "[", "]"):
                return _Tok("math", "\\" + name, pos, end, pre)
            if environments and name in ("begin", "end"):
                m = _ENV_NAME.match(s, end)
                if m is None:
                    return _Tok("char", "\\" + name, pos, end, pre)
                return _Tok(name, m.group(1), pos, m.end(), pre)
            post = end
            if alpha:  # letters-only macro names swallow the whitespace that follows
                while end < n and s[end].isspace():
                    end += 1
                    if end - post >= 2 and s[end - 2 : end] == "\n\n":
                        end -= 2
                        break
            return _Tok("macro", name, pos, end, pre, s[post:end])
        if ch == "{" or (brackets and ch == "["):
            return _Tok("open", ch, pos, pos + 1, pre)
        if ch == "}" or (brackets and ch == "]"):
            return _Tok("close", ch, pos, pos + 1, pre)
        for sp in SPECIALS_BY_LENGTH:
            if s.startswith(sp, pos):
                return _Tok("specials", sp, pos, pos + len(sp), pre)
        return _Tok("char", ch, pos, pos + 1, pre)

    def nodes(self, pos: int, stop=None) -> tuple[list, int]:
        """Parse nodes until ``stop`` ("}", "]", ("env", name), ("math", closer)) or the end."""
        out: list = []
        pending = ""
        brackets = stop == "]"
        while True:
            try:
                tok = self.token(pos, brackets=brackets)
            except _EndOfInput as eoi:
                pending += eoi.final_space
                pos = len(self.s)
                break
            pos = tok.end
            if tok.kind == "char":
                pending += tok.pre + tok.arg
                continue
            if pending or tok.pre:
                out.append(("chars", pending + tok.pre))
                pending = ""
            kind = tok.kind
            if kind == "close":
                if tok.arg == stop:
                    break
                continue  # stray closing brace: ignored
            if kind == "end":
                if stop == ("env", tok.arg):
                    break
                continue  # unmatched \end: ignored
            if kind == "math":
                in_math = isinstance(stop, tuple) and stop[0] == "math"
                if in_math and tok.arg == stop[1]:
                    break
                if tok.arg in _MATH_CLOSERS:
                    continue
                closer = "\\)" if tok.arg == "\\(" else "\\]"
                inner, pos = self.nodes(pos, ("math", closer))
                out.append(("math", tok.arg == "\\[", inner))
            elif kind == "open":
                inner, pos = self.nodes(pos, "}" if tok.arg == "{" else "]")
                out.append(("group", inner))
            elif kind == "begin":
                _, pos = self.args(ENV_ARGS.get(tok.arg, ""), pos, tok.arg)
                inner, pos = self.nodes(pos, ("env", tok.arg))
                out.append(("env", tok.arg, inner))
            elif kind == "macro":
                args, pos = self.args(MACROS.get(tok.arg, ("", None))[0], pos, tok.arg)
                out.append(("macro", tok.arg, args, tok.post))
            else:  # specials
                out.append(("specials", tok.arg))
        if pending:
            out.append(("chars", pending))
        return out, pos

    def args(self, spec: str, pos: int, name: str) -> tuple[list | None, int]:
        """Parse macro/environment arguments; running off the end drops them all."""
        if not spec:
            return None, pos
        out: list = []
        p = pos
        node: tuple | None
        try:
            for kind in spec:
                if kind == "{":
                    node, p = self.expression(p)
                    out.append(node)
                elif kind == "[":
                    if name == "\\" and p < len(self.s) and self.s[p].isspace():
                        out.append(None)
                        continue
                    node, p = self.optional(p)
                    out.append(node)
                else:
                    tok = self.token(p)
                    if tok.kind == "char" and tok.arg.startswith("*"):
                        out.append(("chars", "*"))
                        p = tok.start + 1
                    else:
                        out.append(None)
        except _EndOfInput:
            return None, pos
        return out, p

    def expression(self, pos: int) -> tuple[tuple, int]:
        """One mandatory argument: a braced group or a single token."""
        tok = self.token(pos, environments=False)
        if tok.kind == "macro":
            if tok.arg == "end":
                return ("chars", ""), tok.start
            return ("macro", tok.arg, None, tok.post), tok.end
        if tok.kind == "math":
            return ("macro", tok.arg, None, ""), tok.end
        if tok.kind == "open":
            inner, p = self.nodes(tok.end, "}")
            return ("group", inner), p
        if tok.kind == "close":
            return ("chars", ""), tok.start
        if tok.kind == "specials":
            return ("specials", tok.arg), tok.end
        return ("chars", tok.arg), tok.end

    def optional(self, pos: int) -> tuple[tuple | None, int]:
        try:
            tok = self.token(pos, brackets=True, environments=False)
        except _EndOfInput:
            return None, pos
        if tok.kind == "open" and tok.arg == "[":
            inner, p = self.nodes(tok.end, "]")
            return ("group", inner), p
        return None, pos


# ------------------------------------------------------------------------------ rendering
# Inside math (``\(..\)``, ``\[..\]``, equation environments) pylatexenc switches to its
# "based-on-source" spacing: whitespace-only text is dropped and the whitespace swallowed after
# an argument-less macro is put back when text follows it.  ``eq`` carries that mode.


def _is_bare_macro(node) -> bool:
    if node is None or node[0] != "macro":
        return False
    args = node[2]
    if args is None:
        return True
    return node[1] == "\\" and args[1] is None  # "\\" keeps only its optional argument


def _render_list(nodes: list, eq: bool) -> str:
    out = []
    prev = None
    for node in nodes:
        if eq and prev is not None and node[0] == "chars" and _is_bare_macro(prev):
            out.append(prev[3])
        out.append(_render(node, eq))
        prev = node
    return "".join(out)


def _arg_text(node, eq: bool) -> str:
    if node is None:
        return ""
    if node[0] == "group":
        return _render_list(node[1], eq)
    return _render(node, eq)


def _indent_block(content: str) -> str:
    return "\n    " + content.replace("\n", "\n    ") + "\n"


def _style(text: str, style: str) -> str:
    upper, lower = STYLE_OFFSETS[style]
    holes = STYLE_HOLES.get(style, {})
    out = []
    for ch in text:
        if ch in holes:
            out.append(holes[ch])
        elif "A" <= ch <= "Z":
            out.append(chr(upper + ord(ch) - ord("A")))
        elif "a" <= ch <= "z":
            out.append(chr(lower + ord(ch) - ord("a")))
        else:
            out.append(ch)
    return "".join(out)


def _accent(args: list | None, mark: str, eq: bool) -> str:
    base = _render_list([args[0]], eq).strip() if args else " "
    base = base.replace("ı", "i").replace("ȷ", "j")
    return "".join(unicodedata.normalize("NFC", ch + mark) for ch in base)


def _format(template: str, args: list | None, eq: bool) -> str:
    if "%" not in template or len(template) == 1:
        return template
    texts = [_arg_text(a, eq) for a in args or []]
    values: tuple | dict
    if _PERCENT_S.search(template):
        values = tuple(texts)
    else:
        values = {str(i + 1): t for i, t in enumerate(texts)}
    try:
        return template % values  # a missing named argument raises KeyError, as upstream
    except (TypeError, ValueError):
        return template


def _matrix(nodes: list, eq: bool) -> str:
    rows: list[list[str]] = []
    row: list[str] = []
    cell: list = []
    for node in nodes:
        if node[0] == "specials" and node[1] == "&":
            if cell:
                row.append(_render_list(cell, eq).strip())
            cell = []
        elif node[0] == "macro" and node[1] == "\\":
            if cell:
                row.append(_render_list(cell, eq).strip())
            cell = []
            rows.append(row)
            row = []
        else:
            cell.append(node)
    if cell:
        row.append(_render_list(cell, eq).strip())
    rows.append(row)
    width = max(len(c) for r in rows for c in r)  # no cells at all: ValueError, as upstream
    return "[ " + "; ".join(" ".join(c.rjust(width) for c in r) for r in rows) + " ]"


def _render(node, eq: bool) -> str:
    kind = node[0]
    if kind == "chars":
        return "" if eq and not node[1].strip() else node[1]
    if kind == "group":
        return _render_list(node[1], eq)
    if kind == "specials":
        return SPECIALS[node[1]]
    if kind == "math":
        content = _render_list(node[2], True).strip()
        return _indent_block(content) if node[1] else content
    if kind == "env":
        name, body = node[1], node[2]
        if name in MATRIX_ENVS:
            return _matrix(body, eq)
        if name in EQUATION_ENVS:
            return _indent_block(_render_list(body, True).strip())
        if name in CENTERED_ENVS:
            return "\n" + _render_list(body, eq) + "\n"
        return _render_list(body, eq)
    name, args = node[1], node[2]
    rendering = MACROS.get(name, ("", None))[1]
    if rendering is None:
        return ""
    if isinstance(rendering, str):
        return _format(rendering, args, eq)
    how = rendering[0]
    if how == "join":
        return "".join(_arg_text(a, eq) for a in args or [])
    if how == "style":
        return _style(_arg_text(args[0], eq) if args else "", rendering[1])
    return _accent(args, rendering[1], eq)


def latex_to_text(latex: str) -> str:
    """Render ``latex`` as plain text (may raise on inputs ``pylatexenc`` rejects)."""
    nodes, _ = _Parser(latex).nodes(0)
    return _render_list(nodes, False)
