"""A Python-like condition (``amount > 100 and region == 'west'``) as a pyarrow compute expression.

The text is parsed by Python's own ``ast`` module and translated node by node into
``pyarrow.compute`` expressions; nothing is evaluated as Python. Supported: column names (a name
that is not an identifier: ``col("unit price")``), numbers, strings, booleans, ``None``,
comparisons (chains too), ``and``/``or``/``not``, ``+ - * /``, unary ``-``, ``x in [1, 2]``,
``x not in (...)``, ``is_null(x)`` and ``is_valid(x)``.
"""

from __future__ import annotations

import ast
import operator
from typing import Any

import pyarrow.compute as pc

MAX_EXPRESSION_CHARS = 10_000  # a condition on a command line, not a program

_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_ARITH = {ast.Add: "add_checked", ast.Sub: "subtract_checked", ast.Mult: "multiply_checked", ast.Div: "divide"}


def parse_expression(text: str) -> pc.Expression:
    """The compute expression of ``text``.

    Raises:
        ValueError: the text is not a supported condition (the message says which part).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError('expr: give a condition such as "amount > 100"')
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expr: longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"expr {text!r}: not a condition: {exc.msg}") from None
    return _node(tree.body, text)


def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str | bool | type(None)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        value = node.operand.value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return -value
    raise ValueError(f"expr {text!r}: {ast.unparse(node)!r} is not a literal")


def _node(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Name):
        return pc.field(node.id)
    if isinstance(node, ast.Constant):
        return pc.scalar(_literal(node, text))
    if isinstance(node, ast.BoolOp):
        values = [_node(v, text) for v in node.values]
        result = values[0]
        for value in values[1:]:
            result = (result & value) if isinstance(node.op, ast.And) else (result | value)
        return result
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            return ~_node(node.operand, text)
        if isinstance(node.op, ast.USub):
            return pc.negate_checked(_node(node.operand, text))
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        return getattr(pc, _ARITH[type(node.op)])(_node(node.left, text), _node(node.right, text))
    if isinstance(node, ast.Compare):
        result = None
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, ast.In | ast.NotIn):
                if not isinstance(right, ast.List | ast.Tuple | ast.Set):
                    raise ValueError(f"expr {text!r}: 'in' takes a list of literals")
                part = pc.field(left.id) if isinstance(left, ast.Name) else _node(left, text)
                part = part.isin([_literal(e, text) for e in right.elts])
                part = ~part if isinstance(op, ast.NotIn) else part
            elif type(op) in _COMPARE:
                part = _COMPARE[type(op)](_node(left, text), _node(right, text))
            else:
                raise ValueError(f"expr {text!r}: {type(op).__name__} is not supported")
            result = part if result is None else result & part
            left = right
        return result
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1 and not node.keywords:
        name, (arg,) = node.func.id, node.args
        if name == "col":
            return pc.field(_literal(arg, text))
        if name in ("is_null", "is_valid"):
            return getattr(_node(arg, text), name)()
    raise ValueError(f"expr {text!r}: {ast.unparse(node)!r} is not supported")
