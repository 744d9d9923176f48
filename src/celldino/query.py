"""Row selections written as text (`profile.controls`): a small expression grammar, never code.

A selection such as `Metadata_pert_type == 'control'` used to go to `pandas.DataFrame.query`,
which evaluates Python: attributes, calls and `@` locals reach any object, so a shared config
could run any command (`@pd.io.common.os.system(...)`). Here the text is parsed by Python's `ast`
into a tree whose every node must be one of a short whitelist, then evaluated with vectorised
pandas operations over the table's columns. Nothing is looked up by name except columns.

The grammar (`GRAMMAR`):

    expr     := expr or expr | expr and expr | not expr | ( expr ) | compare | column
    compare  := operand OP operand [OP operand ...]     (chained as Python chains them)
    OP       := == | != | < | <= | > | >= | in | not in
    operand  := column | literal | [literal, ...] | (literal, ...)
    column   := a name (Metadata_Plate) or any text in `backticks` (`Metadata_Dose (uM)`)
    literal  := a number (0, -1.5, 1e-3), a string ('DMSO' or "DMSO"), True or False

`&`, `|` and `~` are read as `and`, `or`, `not` (as pandas reads them). `==`/`!=` against a list
mean `in`/`not in` (as in pandas). A bare column must be a boolean column. Everything else (an
attribute `a.b`, a call `f()`, a subscript `a[0]`, `@name`, arithmetic, lambda, comprehensions)
is refused with `QueryError`, naming the setting, the fragment and this grammar; a column not in
the table is refused naming the table's Metadata columns.
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any

import numpy as np
import pandas as pd

from celldino.errors import DataError

GRAMMAR = (
    "comparisons of a column with a number, a string or a list of them "
    "(== != < <= > >= in, not in), joined by and, or, not (or &, |, ~) and parentheses; "
    "a column is a name or `any text in backticks`; "
    "e.g. \"Metadata_pert_type == 'control'\" or \"Metadata_Compound in ['DMSO', 'none']\""
)
MAX_LENGTH = 5000  # characters: a selection is a line, not a program
MAX_DEPTH = 100  # nested and/or/not

_BACKTICK = "_celldino_backtick_"
_COMPARE = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
}
_LIST_OPS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)
_IDENT = re.compile(r"[\w.]+")
_OPS = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class QueryError(DataError):
    """A selection that is not in the grammar, or that names a column the table lacks."""


def _refuse(setting: str, fragment: str, why: str) -> QueryError:
    return QueryError(
        f"{setting}: {fragment!r} is not allowed in a selection ({why}); a selection is {GRAMMAR}"
    )


def _rewrite(text: str, setting: str) -> tuple[str, dict[str, str]]:
    """Text Python can parse: `backticked` names → placeholders, & | → and or (outside strings)."""
    out: list[str] = []
    names: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "'\"":  # a string literal: copied as written (the parser checks it)
            j = i + 1
            while j < n and text[j] != ch:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif ch == "`":
            j = text.find("`", i + 1)
            if j < 0:
                raise _refuse(setting, text[i:], "a backtick is not closed")
            name = text[i + 1 : j]
            if not name:
                raise _refuse(setting, "``", "empty column name")
            token = f"{_BACKTICK}{len(names)}"
            names[token] = name
            out.append(f" {token} ")
            i = j + 1
        elif ch == "@":
            m = _IDENT.match(text, i + 1)
            raise _refuse(
                setting,
                "@" + (m.group(0) if m else text[i + 1 : i + 20]),
                "'@' reaches Python variables; name columns only",
            )
        elif ch == "&":
            out.append(" and ")
            i += 1
        elif ch == "|":
            out.append(" or ")
            i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out), names


class _Checker:
    """Walks the parsed tree, refusing any node outside the grammar."""

    def __init__(self, source: str, names: dict[str, str], setting: str):
        self.source, self.names, self.setting = source, names, setting

    def fragment(self, node: ast.AST) -> str:
        seg = ast.get_source_segment(self.source, node) or type(node).__name__
        for token, name in self.names.items():
            seg = seg.replace(token, f"`{name}`")
        seg = " ".join(seg.split())
        return seg if len(seg) <= 80 else seg[:77] + "..."

    def refuse(self, node: ast.AST, why: str) -> QueryError:
        return _refuse(self.setting, self.fragment(node), why)

    def boolean(self, node: ast.AST, depth: int = 0) -> None:
        """A node that yields one bool per row."""
        if depth > MAX_DEPTH:
            raise self.refuse(node, f"nested more than {MAX_DEPTH} deep")
        if isinstance(node, ast.BoolOp):
            for v in node.values:
                self.boolean(v, depth + 1)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)):
            self.boolean(node.operand, depth + 1)
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            self.operand(node.left)
            for i, op in enumerate(node.ops):
                if type(op) not in _COMPARE:
                    word = {ast.Is: "is", ast.IsNot: "is not"}.get(type(op), type(op).__name__)
                    raise self.refuse(node, f"{word!r} is not one of its comparisons")
                self.operand(sides[i + 1])
                lists = [isinstance(x, (ast.List, ast.Tuple)) for x in sides[i : i + 2]]
                if any(lists) and type(op) not in _LIST_OPS:
                    raise self.refuse(node, "a list goes only with ==, !=, in or not in")
        elif isinstance(node, ast.Name):
            self.column(node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            pass
        else:
            raise self.refuse(node, self.why(node))

    def operand(self, node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            self.column(node)
        elif isinstance(node, (ast.List, ast.Tuple)):
            for elt in node.elts:
                self.literal(elt)
        else:
            self.literal(node)

    def literal(self, node: ast.AST) -> None:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = node.operand
            if isinstance(inner, ast.Constant) and type(inner.value) in (int, float):
                return
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bool):
            return
        raise self.refuse(node, self.why(node, "a number, a string, True/False or a column"))

    def column(self, node: ast.Name) -> None:
        if node.id not in self.names and node.id.startswith("__"):
            raise self.refuse(node, "a name with leading underscores is not a column name")

    def why(self, node: ast.AST, expected: str = "a comparison") -> str:
        kinds = {
            ast.Attribute: "attribute access",
            ast.Call: "a function call",
            ast.Subscript: "indexing",
            ast.Lambda: "a lambda",
            ast.BinOp: "arithmetic",
            ast.IfExp: "a conditional expression",
            ast.NamedExpr: "an assignment",
            ast.ListComp: "a comprehension",
            ast.SetComp: "a comprehension",
            ast.DictComp: "a comprehension",
            ast.GeneratorExp: "a comprehension",
            ast.Dict: "a dict",
            ast.Set: "a set",
            ast.JoinedStr: "an f-string",
            ast.Starred: "unpacking",
        }
        what = kinds.get(type(node), type(node).__name__)
        return f"{what} where {expected} was expected"


def parse(text: str, setting: str = "selection") -> tuple[ast.expr, dict[str, str]]:
    """The checked tree of a selection and its {placeholder: backticked column}; raises
    QueryError naming `setting` when the text is not in the grammar."""
    if not isinstance(text, str):
        raise QueryError(f"{setting}: expected text, got {type(text).__name__}")
    if not text.strip():
        raise QueryError(f"{setting}: the selection is empty; a selection is {GRAMMAR}")
    if len(text) > MAX_LENGTH:
        raise _refuse(setting, text[:40] + "...", f"longer than {MAX_LENGTH} characters")
    if _BACKTICK in text:
        raise _refuse(setting, _BACKTICK, "a name celldino reserves")
    source, names = _rewrite(text, setting)
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        detail = getattr(e, "msg", None) or type(e).__name__
        raise _refuse(setting, text.strip(), f"not a valid expression: {detail}") from None
    _Checker(source.strip(), names, setting).boolean(tree.body)
    return tree.body, names


def columns(text: str, setting: str = "selection") -> list[str]:
    """The column names a selection reads, in order of first mention."""
    tree, names = parse(text, setting)
    out = [names.get(n.id, n.id) for n in ast.walk(tree) if isinstance(n, ast.Name)]
    return list(dict.fromkeys(out))


def _value(node: ast.expr) -> Any:
    if isinstance(node, ast.UnaryOp):  # -1.5 / +2 (checked numeric)
        v = node.operand.value  # type: ignore[attr-defined]
        return -v if isinstance(node.op, ast.USub) else v
    return node.value  # type: ignore[attr-defined]


class _Evaluator:
    def __init__(self, frame: pd.DataFrame, names: dict[str, str], setting: str, text: str):
        self.frame, self.names, self.setting, self.text = frame, names, setting, text

    def column(self, node: ast.Name) -> pd.Series:
        name = self.names.get(node.id, node.id)
        if name not in self.frame.columns:
            meta = [str(c) for c in self.frame.columns if str(c).startswith("Metadata_")]
            shown = meta or [str(c) for c in self.frame.columns][:30]
            raise QueryError(
                f"{self.setting}: no column {name!r} in the table (the selection "
                f"{self.text!r}); columns: {', '.join(shown)}"
            )
        col = self.frame[name]
        if isinstance(col, pd.DataFrame):
            raise QueryError(f"{self.setting}: column {name!r} appears more than once in the table")
        return col

    def operand(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            return self.column(node)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [_value(e) for e in node.elts]
        return _value(node)

    def numbers(self, col: pd.Series) -> pd.Series:
        """A text column compared with a number, read as numbers: metadata are read as text as
        written (`io.tables.read_table`), so `Metadata_Dose == 0` compares the dose '0' or '0.0'
        as the number it is. A cell that is not a number is refused, naming it."""
        filled = col.notna() & (col.astype(str).str.strip() != "")
        num = pd.to_numeric(col.where(filled), errors="coerce")
        bad = filled & num.isna() & ~col.astype(str).str.strip().str.lower().isin(["nan"])
        if bad.any():
            raise QueryError(
                f"{self.setting}: {_fragment(self.text)!r} compares column {col.name!r} with a "
                f"number, but it holds {col[bad].iloc[0]!r}; compare it with a string, e.g. "
                f"{col.name} == '{col[bad].iloc[0]}'"
            )
        return num

    def _as_numbers(self, left: Any, right: Any) -> tuple[Any, Any]:
        def number(v: Any) -> bool:
            items = v if isinstance(v, list) else [v]
            return bool(items) and all(type(x) in (int, float) for x in items)

        def text(v: Any) -> bool:
            return isinstance(v, pd.Series) and (
                pd.api.types.is_object_dtype(v.dtype) or pd.api.types.is_string_dtype(v.dtype)
            )

        if text(left) and number(right):
            left = self.numbers(left)
        elif text(right) and number(left):
            right = self.numbers(right)
        return left, right

    def compare(self, left: Any, op: ast.cmpop, right: Any) -> np.ndarray:
        n = len(self.frame)
        left, right = self._as_numbers(left, right)
        if isinstance(op, (ast.In, ast.NotIn)) or (
            isinstance(op, (ast.Eq, ast.NotEq))
            and (isinstance(left, list) or isinstance(right, list))
        ):
            if isinstance(left, list) and isinstance(right, pd.Series):
                left, right = right, left  # ['a', 'b'] == col reads as col in ['a', 'b']
            if not isinstance(right, list):
                if isinstance(right, pd.Series):
                    raise QueryError(
                        f"{self.setting}: {_fragment(self.text)!r}: 'in' needs a list of values "
                        "on its right, e.g. Metadata_Compound in ['DMSO', 'none']"
                    )
                right = [right]
            if isinstance(left, pd.Series):
                hit = left.isin(right).to_numpy(dtype=bool)
            else:
                hit = np.full(n, left in right, dtype=bool)
            return ~hit if isinstance(op, (ast.NotIn, ast.NotEq)) else hit
        sym = _COMPARE[type(op)]
        try:
            res = _OPS[sym](left, right)
        except (TypeError, ValueError) as e:
            raise QueryError(
                f"{self.setting}: cannot compare in {_fragment(self.text)!r} ({e}); compare a "
                "text column with a string and a number column with a number"
            ) from None
        if isinstance(res, pd.Series):  # a nullable column gives <NA> for a missing value
            return res.fillna(False).to_numpy(dtype=bool)
        return np.full(n, bool(res), dtype=bool)

    def boolean(self, node: ast.expr) -> np.ndarray:
        if isinstance(node, ast.BoolOp):
            parts = [self.boolean(v) for v in node.values]
            fn = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            return fn.reduce(parts)
        if isinstance(node, ast.UnaryOp):
            return ~self.boolean(node.operand)
        if isinstance(node, ast.Constant):
            return np.full(len(self.frame), bool(node.value), dtype=bool)
        if isinstance(node, ast.Name):
            col = self.column(node)
            if not pd.api.types.is_bool_dtype(col.dtype):
                raise QueryError(
                    f"{self.setting}: column {col.name!r} stands alone in the selection but is "
                    f"{col.dtype}, not true/false; compare it, e.g. {col.name} == 'value'"
                )
            return col.fillna(False).to_numpy(dtype=bool)
        assert isinstance(node, ast.Compare)
        mask = np.ones(len(self.frame), dtype=bool)
        left = self.operand(node.left)
        for op, comp in zip(node.ops, node.comparators):
            right = self.operand(comp)
            mask &= self.compare(left, op, right)
            left = right
        return mask


def _fragment(text: str) -> str:
    return " ".join(text.split())


def evaluate(frame: pd.DataFrame, text: str, setting: str = "selection") -> np.ndarray:
    """A bool array (len(frame),): the rows `text` selects. Raises QueryError naming `setting`
    when `text` is outside the grammar (see the module docstring) or names a missing column."""
    tree, names = parse(text, setting)
    return _Evaluator(frame, names, setting, text).boolean(tree)
