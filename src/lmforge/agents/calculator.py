"""The calculator tool: arithmetic read with `ast` and evaluated node by node, never with `eval`.

Accepted: int and float literals, + - * / // % **, parentheses and unary minus/plus. Anything else (names, calls,
attribute access, comparisons, strings...) is refused with a one-line `CalculatorError`, and so are expressions
longer than `MAX_CHARS`, exponents above `MAX_EXPONENT`, and results beyond `MAX_DIGITS` digits (checked before a
power is computed, so ``9**9**9`` costs nothing)."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from lmforge.errors import LmforgeError

MAX_CHARS = 200
MAX_EXPONENT = 64
MAX_DIGITS = 100
Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_REFUSED: dict[type[ast.AST], str] = {
    ast.Name: "names are not allowed", ast.Call: "function calls are not allowed",
    ast.Attribute: "attribute access is not allowed", ast.Subscript: "indexing is not allowed",
    ast.Compare: "comparisons are not allowed", ast.BoolOp: "boolean operators are not allowed",
    ast.Lambda: "lambdas are not allowed"}


class CalculatorError(LmforgeError):
    """An expression the calculator refuses or cannot evaluate (one line)."""


def evaluate(expression: str) -> Number:
    """The value of the arithmetic `expression` (see the module docstring); CalculatorError otherwise."""
    text = expression.strip()
    if not text:
        raise CalculatorError("empty expression; write arithmetic such as 37 * 48")
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"expression of {len(text)} characters; at most {MAX_CHARS} are accepted")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise CalculatorError(f"cannot parse {text!r} as arithmetic; use numbers, + - * / // % ** and "
                              "parentheses") from None
    return _value(tree.body)


def format_number(value: Number) -> str:
    """An integer as its digits; a float with up to 10 significant digits (5.0 -> "5")."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.10g}"


def calculate(expression: str) -> str:
    """`evaluate`, formatted with `format_number`."""
    return format_number(evaluate(expression))


def _value(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalculatorError(f"{node.value!r} is not a number; only numbers and arithmetic are allowed")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_value(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError(f"the result has more than {MAX_DIGITS} digits") from None
    reason = next((why for kind, why in _REFUSED.items() if isinstance(node, kind)),
                  f"{type(node).__name__} is not arithmetic")
    raise CalculatorError(f"{reason}; use numbers, + - * / // % ** and parentheses")


def _check_power(base: Number, exponent: Number) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {format_number(exponent)} is too large (at most {MAX_EXPONENT})")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero (0 to a negative power)")
    if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > MAX_DIGITS:
        raise CalculatorError(f"the result has more than {MAX_DIGITS} digits")
    if isinstance(exponent, float) and base < 0 and not exponent.is_integer():
        raise CalculatorError("a negative number to a fractional power is not a real number")


def _checked(value: Number) -> Number:
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError(f"the result is not a finite number ({value})")
    if isinstance(value, int) and value and math.log10(abs(value)) >= MAX_DIGITS:
        raise CalculatorError(f"the result has more than {MAX_DIGITS} digits")
    if isinstance(value, float) and value and abs(value) >= 10.0 ** MAX_DIGITS:
        raise CalculatorError(f"the result has more than {MAX_DIGITS} digits")
    return value
