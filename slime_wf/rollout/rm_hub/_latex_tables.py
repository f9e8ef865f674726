"""Macro, environment and specials tables for :mod:`._latex_text` (pylatexenc 2.10 defaults).

``MACROS`` maps a macro name to ``(argument spec, rendering)``.  Argument spec letters: ``{``
mandatory, ``[`` optional, ``*`` optional star.  Rendering: a str (``%``-formatted with the
argument texts, like pylatexenc's ``simplify_repl``), ``("join",)`` to output the arguments'
text, ``("style", name)`` for math alphabets, ``("accent", combining char)``, or None to drop
the macro together with its arguments.
"""

from __future__ import annotations

import unicodedata

# Argument-less macros rendered as one character: "name char" pairs.
_SYMBOL_PAIRS = """
pm ± mp ∓ times × div ÷ cdot · ast ∗ star ⋆ circ ∘ bullet ∙ oplus ⊕ ominus ⊖ otimes ⊗ odot ⊙
oslash ⊘ setminus ∖ smallsetminus ∖ cap ∩ cup ∪ sqcap ⊓ sqcup ⊔ uplus ⊎ wedge ∧ vee ∨ lnot ¬
dagger † dag † amalg ⨿ wr ≀ diamond ♢ le ≤ leq ≤ ge ≥ geq ≥ leqslant ⩽ geqslant ⩾ leqq ≦
geqq ≧ neq ≠ ll ≪ gg ≫ approx ≈ approxeq ≊ sim ∼ simeq ≃ backsim ∽ cong ≅ equiv ≡ propto ∝
asymp ≍ doteq ≐ prec ≺ succ ≻ preceq ≼ succeq ≽ subset ⊂ supset ⊃ subseteq ⊆ supseteq ⊇
subsetneq ⊊ supsetneq ⊋ in ∈ notin ∉ ni ∋ perp ⊥ parallel ∥ nparallel ∦ mid | nmid ∤ vdash ⊢
dashv ⊣ top ⊤ lesssim ≲ gtrsim ≳ nleq ≰ ngeq ≱ nless ≮ ngtr ≯ triangleq ≜ bowtie ⋈ smile ⌣
frown ⌢ to → rightarrow → leftarrow ← leftrightarrow ↔ Rightarrow ⇒ Leftarrow ⇐
Leftrightarrow ⇔ longrightarrow ⟶ longleftarrow ⟵ longleftrightarrow ⟷ Longrightarrow ⟹
Longleftarrow ⟸ Longleftrightarrow ⟺ mapsto ↦ longmapsto ⟼ uparrow ↑ downarrow ↓
updownarrow ↕ Uparrow ⇑ Downarrow ⇓ hookrightarrow ↪ hookleftarrow ↩ nearrow ↗ searrow ↘
nwarrow ↖ swarrow ↙ rightleftharpoons ⇌ infty ∞ partial ∂ nabla ∇ forall ∀ exists ∃
nexists ∄ emptyset ∅ varnothing ∅ aleph ℵ beth ℶ hbar ħ hslash ℏ ell ℓ wp ℘ complement ∁
angle ∠ measuredangle ∡ sphericalangle ∢ rightangle ∟ square □ blacksquare ▪ therefore ∴
because ∵ prime ' backprime ‵ surd √ natural ♮ sharp ♯ flat ♭ mho ℧ lozenge ◊ int ∫ iint ∬
iiint ∭ oint ∮ sum ∑ prod ∏ coprod ∐ bigcup ⋃ bigcap ⋂ bigoplus ⊕ bigotimes ⊗ bigvee ⋁
bigwedge ⋀ ldots … dots … dotsc … dotsb … dotsm … dotsi … dotso … cdots ⋯ vdots ⋮ ddots ⋱
iddots ⋰ langle ⟨ rangle ⟩ lfloor ⌊ rfloor ⌋ lceil ⌈ rceil ⌉ lvert | rvert | vert | lVert ‖
rVert ‖ Vert ‖ lbrace { rbrace } textdegree ° textpm ± textmp ∓ texttimes × textdiv ÷
textonehalf ½ textonequarter ¼ textthreequarters ¾ textmu µ texteuro € textsterling £
textendash – textemdash — textperiodcentered ˙ textasciicircum ˆ textasciitilde ~ i ı j ȷ
o ø O Ø ss ß ae æ AE Æ oe œ OE Œ aa å AA Å l ł L Ł
"""
_WORDS = _SYMBOL_PAIRS.split()
_SYMBOLS = dict(zip(_WORDS[::2], _WORDS[1::2], strict=True))
_SYMBOLS.update(
    (name, name)
    for name in (
        "sin cos tan arcsin arccos arctan sinh cosh tanh arcsinh arccosh arctanh ln log exp max min "
        "sup inf lim"
    ).split()
)
_SYMBOLS.update(
    {
        "limsup": "lim sup",
        "liminf": "lim inf",
        "backslash": "\\",
        "textbackslash": "\\",
        ",": " ",
        ";": " ",
        ":": " ",
        " ": " ",
        "!": "",
        "-": "\xad",
        "quad": "  ",
        "qquad": "    ",
        "{": "{",
        "}": "}",
        "$": "$",
        "&": "&",
        "#": "#",
        "_": "_",
        "%": "%",
        "\\": "\n",
    }
)


def _greek() -> dict[str, str]:
    table = {}
    for name in (
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi "
        "omicron pi rho sigma tau upsilon phi chi psi omega"
    ).split():
        uname = "LAMDA" if name == "lambda" else name.upper()
        small = {"epsilon": "GREEK LUNATE EPSILON SYMBOL", "phi": "GREEK PHI SYMBOL"}.get(
            name, "GREEK SMALL LETTER " + uname
        )
        table[name] = unicodedata.lookup(small)
        table[name.capitalize()] = unicodedata.lookup("GREEK CAPITAL LETTER " + uname)
    table.update(varepsilon="ε", vartheta="ϑ", varpi="ϖ", varrho="ϱ", varsigma="ς", varphi="φ", varkappa="ϰ")
    return table


_ACCENTS = {
    "'": "\u0301",
    "`": "\u0300",
    '"': "\u0308",
    "c": "\u0327",
    "^": "\u0302",
    "~": "\u0303",
    "H": "\u030b",
    "k": "\u0328",
    "=": "\u0304",
    "b": "\u0331",
    ".": "\u0307",
    "d": "\u0323",
    "r": "\u030a",
    "u": "\u0306",
    "v": "\u030c",
    "vec": "\u20d7",
    "dot": "\u0307",
    "hat": "\u0302",
    "check": "\u030c",
    "breve": "\u0306",
    "acute": "\u0301",
    "grave": "\u0300",
    "tilde": "\u0303",
    "bar": "\u0305",
    "ddot": "\u0308",
    "not": "\u0338",
}

_STYLES = {
    "mathbf": "bold",
    "mathit": "italic",
    "mathsf": "sans",
    "mathbb": "doublestruck",
    "mathtt": "monospace",
    "mathcal": "script",
    "mathscr": "script",
    "mathfrak": "fraktur",
}

# how a macro renders: a str template, ("join",), ("style", name), ("accent", mark) or None
Rendering = str | tuple[str, ...] | None

MACROS: dict[str, tuple[str, Rendering]] = {name: ("", text) for name, text in _SYMBOLS.items()}
MACROS.update((name, ("", text)) for name, text in _greek().items())
MACROS.update((name, ("{", ("accent", mark))) for name, mark in _ACCENTS.items())
MACROS.update((name, ("{", ("style", style))) for name, style in _STYLES.items())
MACROS.update(
    {
        "frac": ("{{", "%s/%s"),
        "nicefrac": ("{{", "%s/%s"),
        "textfrac": ("", "%s/%s"),
        "sqrt": ("[{", "√(%(2)s)"),
        "\\": ("*[", "\n"),
        "hspace": ("*{", ""),
        "vspace": ("*{", "\n"),
        "textcolor": ("[{{", "%(3)s"),
        "colorbox": ("[{{", "%(3)s"),
        "color": ("[{", None),
        "ref": ("{", "<ref>"),
        "eqref": ("{", "(<ref>)"),
        "url": ("{", "<%s>"),
        "footnote": ("[{", "[%(2)s]"),
        "ket": ("{", "|%s⟩"),
        "bra": ("{", "⟨%s|"),
        "braket": ("{{", "⟨%s|%s⟩"),
    }
)
for _name in ("text", "textrm", "textit", "textbf", "textsc", "textsl", "emph", "mathrm"):
    MACROS[_name] = ("{", ("join",))
for _name in (
    "mbox",
    "textmd",
    "textsf",
    "texttt",
    "textup",
    "label",
    "ensuremath",
    "hypersetup",
    "keywords",
):
    MACROS[_name] = ("{", None)
for _name in ("hphantom", "vphantom", "xleftarrow", "xrightarrow"):
    MACROS[_name] = ("[{", None)
MACROS["includegraphics"] = ("[{", "\n    < g r a p h i c s >\n")
for _name in (
    "overline underline widehat widetilde wideparen overleftarrow overrightarrow "
    "overleftrightarrow underleftarrow underrightarrow underleftrightarrow overbrace "
    "underbrace overgroup undergroup overbracket underbracket overlinesegment "
    "underlinesegment overleftharpoon overrightharpoon"
).split():
    MACROS[_name] = ("{", "%s")

ENV_ARGS = {
    "array": "[{",
    "tabular": "{",
    "tabular*": "{{",
    "tabularx": "{[{",
    "alignat": "{",
    "alignat*": "{",
}
MATRIX_ENVS = frozenset({"array", "pmatrix", "bmatrix", "smallmatrix", "psmallmatrix", "bsmallmatrix"})
EQUATION_ENVS = frozenset(
    {
        "equation",
        "equation*",
        "eqnarray",
        "eqnarray*",
        "align",
        "align*",
        "multline",
        "multline*",
        "gather",
        "gather*",
        "dmath",
        "dmath*",
    }
)
CENTERED_ENVS = frozenset({"center", "flushleft", "flushright"})

SPECIALS = {"---": "—", "--": "–", "``": "“", "''": "”", "!`": "¡", "?`": "¿", "&": "   ", "~": "\xa0"}
SPECIALS_BY_LENGTH = sorted(SPECIALS, key=len, reverse=True)

STYLE_OFFSETS = {
    "bold": (0x1D400, 0x1D41A),
    "italic": (0x1D434, 0x1D44E),
    "script": (0x1D49C, 0x1D4B6),
    "fraktur": (0x1D504, 0x1D51E),
    "doublestruck": (0x1D538, 0x1D552),
    "sans": (0x1D5A0, 0x1D5BA),
    "monospace": (0x1D670, 0x1D68A),
}
# Letters Unicode encodes outside the contiguous math-alphanumeric blocks.
STYLE_HOLES = {
    "italic": {"h": "ℎ"},
    "script": {
        "B": "ℬ",
        "E": "ℰ",
        "F": "ℱ",
        "H": "ℋ",
        "I": "ℐ",
        "L": "ℒ",
        "M": "ℳ",
        "R": "ℛ",
        "e": "ℯ",
        "g": "ℊ",
        "o": "ℴ",
    },
    "fraktur": {"C": "ℭ", "H": "ℌ", "I": "ℑ", "R": "ℜ", "Z": "ℨ"},
    "doublestruck": {"C": "ℂ", "H": "ℍ", "N": "ℕ", "P": "ℙ", "Q": "ℚ", "R": "ℝ", "Z": "ℤ"},
}
