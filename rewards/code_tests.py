"""Verdicts of the `code` reward, computed in the trusted process from plain values the sandbox brings back.

An assert test (``assert f(2) == 4``, ``assert math.isclose(area(2), 12.566, rel_tol=1e-3)``,
``assert sorted(g([3, 1])) == [1, 3]``) is split by `AssertTest.parse`:

- every maximal sub-expression that needs the candidate's code goes to the sandbox as an expression to evaluate:
  a call of anything but a safe function below (its arguments, the test's inputs, go with it), a bare name, an
  attribute of anything but `math`; ``list``/``tuple``/``sorted``/``set``/``frozenset`` wrapped directly around such
  an expression go with it (so a generator's items come back), using the builtins as they were before the code ran;
- the rest (comparisons, boolean and arithmetic operators, literals, subscripts, calls of `SAFE_FUNCTIONS` and of
  `math`) is evaluated here on the values that came back, which `sandbox.decode` rebuilt from plain data. So an
  expected value never enters the sandboxed process, and the code cannot choose how it is compared: an object whose
  ``__eq__`` is always true does not come back at all (only exact builtin types do), a replaced builtin or a walked
  frame changes at most the values the code answers with, and an exit, a printed verdict or an exception at exit
  reports nothing.

Equality (`equal`) is Python's, except that two floats compare within a relative tolerance of `FLOAT_REL_TOL`
(absolute `FLOAT_ABS_TOL` near zero), element by element inside lists, tuples and dict values; an int against a
float compares exactly. Printed outputs (`outputs_match`) compare line by line after stripping trailing spaces and
blank lines around; where they differ, two numbers of which one is written with a point or an exponent compare
within `PRINTED_FLOAT_TOL` (printing rounds); two integers only exactly.

Sub-expressions that use no name of the code's (``list(range(5))``, ``pow(2, 5)``, ``[i * i for i in range(3)]``) are
expected values: they are computed here, with this process's own builtins, never in the sandbox where the code
could have replaced them.

A test of another shape (statements other than asserts and ``import math``, a lambda, a comprehension whose element
compares) is refused with an error naming it, before any code runs.
"""

from __future__ import annotations

import ast
import builtins
import math
import operator
from dataclasses import dataclass

FLOAT_REL_TOL, FLOAT_ABS_TOL, PRINTED_FLOAT_TOL = 1e-9, 1e-12, 1e-6
# Evaluated here on values the code chose: nothing whose cost grows with a number's value (range, factorial, comb),
# so an answer of 10**12 cannot stall the reward.
SAFE_FUNCTIONS = ("abs", "all", "any", "bool", "dict", "float", "frozenset", "int", "isinstance", "len", "list",
                  "max", "min", "round", "set", "sorted", "str", "sum", "tuple", "type", "reversed", "zip",
                  "enumerate", "bytes")
_CONVERTERS = ("list", "tuple", "sorted", "set", "frozenset")
# Names an expected value may use (computed here, never in the sandbox): the test author's, so their cost is theirs.
EXPECTED_NAMES = SAFE_FUNCTIONS + ("range", "pow", "chr", "ord", "divmod", "hex", "bin", "oct", "map", "filter",
                                   "math")
_MATH = {name: getattr(math, name) for name in (
    "isclose", "isfinite", "isinf", "isnan", "sqrt", "fabs", "floor", "ceil", "trunc", "exp", "log", "log2", "log10",
    "pow", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "hypot", "fsum", "copysign", "degrees", "radians",
    "pi", "e", "tau", "inf", "nan", "gcd")}
_CMP = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.Is: operator.is_, ast.IsNot: operator.is_not, ast.In: lambda a, b: a in b,
        ast.NotIn: lambda a, b: a not in b}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.BitXor: operator.xor,
           ast.LShift: operator.lshift, ast.RShift: operator.rshift}
_MAX_SIZE = 10 ** 6  # the largest sequence or exponent an operator here may produce from a returned value


def equal(a, b) -> bool:
    """Python's ``a == b`` on plain data, with floats compared within `FLOAT_REL_TOL`.

    >>> equal([0.1 + 0.2, "x"], [0.3, "x"]), equal((1, 2), [1, 2]), equal({"a": 1.0}, {"a": 1}), equal(1e10, 10**10 + 1)
    (True, False, True, False)
    """
    if type(a) is float and type(b) is float:  # an int against a float compares exactly: 1e10 is not 10000000001
        return a == b or math.isclose(a, b, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)
    if type(a) in (list, tuple) and type(a) is type(b):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if type(a) is dict and type(b) is dict:
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a == b


def _compare(ops: tuple, *values) -> bool:
    for op, left, right in zip(ops, values, values[1:]):
        if op == "Eq":
            ok = equal(left, right)
        elif op == "NotEq":
            ok = not equal(left, right)
        else:
            ok = _CMP[getattr(ast, op)](left, right)
        if not ok:
            return False
    return True


def _binop(op: str, a, b):
    if op == "Mod" and type(a) in (str, bytes):
        raise TypeError("%-formatting a returned value is not a check")  # '%0999999999d' % 1 would fill memory
    if op in ("Pow", "LShift") and type(b) in (int, float) and abs(b) > 10_000:
        raise OverflowError("exponent too large to check")
    if op == "Mult" and any(type(x) in (str, bytes, list, tuple) for x in (a, b)):
        n = b if type(b) is int else a
        if type(n) is int and n * max(len(a) if type(a) is not int else 1, len(b) if type(b) is not int else 1) > _MAX_SIZE:
            raise OverflowError("product too large to check")
    return _BINOPS[getattr(ast, op)](a, b)


def _uses_no_code(node: ast.AST) -> bool:
    """Whether `node` is an expected value: every name it reads is one of `EXPECTED_NAMES` or bound by one of its own
    comprehensions, every attribute a `math` one, and nothing else can run code (no lambda, no walrus)."""
    bound = {t.id for c in ast.walk(node) if isinstance(c, ast.comprehension)
             for t in ast.walk(c.target) if isinstance(t, ast.Name)}
    for n in ast.walk(node):
        if isinstance(n, (ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom, ast.Starred)):
            return False
        if isinstance(n, ast.Name) and n.id not in bound and n.id not in EXPECTED_NAMES:
            return False
        if isinstance(n, ast.Attribute) and not (
                isinstance(n.value, ast.Name) and n.value.id == "math" and not n.attr.startswith("_")):
            return False
    return True


class _Splitter(ast.NodeTransformer):
    """Replace the sub-expressions the sandbox must evaluate by names ``__v0``, ``__v1``..., collecting their source.
    A sub-expression that uses none of the code's names stays here (`_uses_no_code`)."""

    def __init__(self, source: str):
        self.source, self.exprs = source, []

    def _sandbox(self, node: ast.expr, text: str | None = None) -> ast.expr:
        if text is None and _uses_no_code(node):
            return node  # an expected value: evaluated here, with this process's builtins
        for sub in ast.walk(node):
            if isinstance(sub, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
                inner = [sub.elt] if hasattr(sub, "elt") else [sub.key, sub.value]
                if any(isinstance(n, (ast.Compare, ast.BoolOp)) for e in inner for n in ast.walk(e)):
                    raise ValueError("a comprehension whose items compare would be judged inside the sandbox")
        self.exprs.append(text if text is not None else ast.unparse(node))
        return ast.copy_location(ast.Name(id=f"__v{len(self.exprs) - 1}", ctx=ast.Load()), node)

    def generic_visit(self, node):  # any node not handled below: the candidate's business
        if isinstance(node, ast.expr):
            return self._sandbox(node)
        return super().generic_visit(node)

    def visit_Constant(self, node):
        return node

    def visit_Name(self, node):
        if node.id in SAFE_FUNCTIONS:  # e.g. the type in isinstance(f(x), int)
            return ast.copy_location(ast.Name(f"__safe_{node.id}", ast.Load()), node)
        return self._sandbox(node)

    def visit_Compare(self, node):
        ops = ast.Constant(tuple(type(op).__name__ for op in node.ops))
        args = [ops, self.visit(node.left), *[self.visit(c) for c in node.comparators]]
        return ast.copy_location(ast.Call(ast.Name("__compare", ast.Load()), args, []), node)

    def visit_BinOp(self, node):
        args = [ast.Constant(type(node.op).__name__), self.visit(node.left), self.visit(node.right)]
        return ast.copy_location(ast.Call(ast.Name("__binop", ast.Load()), args, []), node)

    def visit_BoolOp(self, node):
        node.values = [self.visit(v) for v in node.values]
        return node

    def visit_UnaryOp(self, node):
        node.operand = self.visit(node.operand)
        return node

    def visit_IfExp(self, node):
        node.test, node.body, node.orelse = self.visit(node.test), self.visit(node.body), self.visit(node.orelse)
        return node

    def _elements(self, node):
        for name in ("elts", "keys", "values"):
            if hasattr(node, name):
                setattr(node, name, [None if e is None else self.visit(e) for e in getattr(node, name)])
        return node

    visit_Tuple = visit_List = visit_Set = visit_Dict = _elements

    def visit_Starred(self, node):
        node.value = self.visit(node.value)
        return node

    def visit_Subscript(self, node):
        node.value, node.slice = self.visit(node.value), self.visit(node.slice)
        return node

    def visit_Slice(self, node):
        for name in ("lower", "upper", "step"):
            if getattr(node, name) is not None:
                setattr(node, name, self.visit(getattr(node, name)))
        return node

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr in _MATH:
            return ast.copy_location(ast.Subscript(ast.Name("__math", ast.Load()), ast.Constant(node.attr),
                                                   ast.Load()), node)
        return self._sandbox(node)

    def visit_Call(self, node):
        func = node.func
        is_math = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "math"
        safe = isinstance(func, ast.Name) and func.id in SAFE_FUNCTIONS
        if is_math and func.attr not in _MATH:  # factorial, comb...: only on constants (an expected value), here
            return self._sandbox(node)
        if safe and func.id in _CONVERTERS and len(node.args) == 1 and not node.keywords \
                and self._needs_sandbox(node.args[0]):
            inner = ast.unparse(node.args[0])
            return self._sandbox(node, f"__pt_{func.id}({inner})")
        if not (safe or is_math):
            return self._sandbox(node)
        node.func = self.visit_Attribute(func) if is_math else ast.Name(f"__safe_{func.id}", ast.Load())
        node.args = [self.visit(a) for a in node.args]
        for kw in node.keywords:
            kw.value = self.visit(kw.value)
        return node

    def _needs_sandbox(self, node) -> bool:
        probe = _Splitter(self.source)
        probe.visit(ast.parse(ast.unparse(node), mode="eval").body)
        return bool(probe.exprs)


@dataclass(frozen=True)
class AssertTest:
    """One assert test split into what the sandbox evaluates (`exprs`) and the verdict evaluated here (`check`)."""

    source: str
    exprs: tuple[str, ...]
    check: object  # a compiled expression over __v0.. and the safe names

    @classmethod
    def parse(cls, source: str) -> AssertTest:
        try:
            module = ast.parse(source)
        except SyntaxError as e:
            raise ValueError(f"test {source!r:.80} is not valid Python: {e.msg}") from None
        conditions = []
        for stmt in module.body:
            if isinstance(stmt, ast.Import) and all(a.name == "math" and a.asname is None for a in stmt.names):
                continue
            if not isinstance(stmt, ast.Assert):
                raise ValueError(f"test {source!r:.80}: only `assert <expression>` statements (and `import math`) "
                                 f"are supported, got {type(stmt).__name__}")
            conditions.append(stmt.test)
        if not conditions:
            raise ValueError(f"test {source!r:.80} asserts nothing")
        splitter = _Splitter(source)
        try:
            parts = [splitter.visit(c) for c in conditions]
        except ValueError as e:
            raise ValueError(f"test {source!r:.80}: {e}") from None
        if not splitter.exprs:
            raise ValueError(f"test {source!r:.80} calls none of the code, so any answer would pass it")
        body = parts[0] if len(parts) == 1 else ast.BoolOp(ast.And(), parts)
        tree = ast.fix_missing_locations(ast.Expression(body))
        return cls(source, tuple(splitter.exprs), compile(tree, "<test check>", "eval"))

    def verdict(self, values: list) -> bool:
        """Whether the test passes given the sandbox's values for `exprs` (`sandbox.run_calls` values)."""
        if any(v[0] != "ok" for v in values):
            return False
        scope = {f"__v{i}": v[1] for i, v in enumerate(values)}
        scope.update({f"__safe_{n}": getattr(builtins, n) for n in SAFE_FUNCTIONS})
        scope.update({n: getattr(builtins, n) for n in EXPECTED_NAMES if hasattr(builtins, n)})
        scope["math"] = math  # only in expected values: sub-expressions that use none of the code's values
        scope.update({"__compare": _compare, "__binop": _binop, "__math": _MATH})
        try:
            return bool(eval(self.check, {"__builtins__": {}}, scope))  # noqa: S307 - whitelisted nodes, plain values
        except Exception:  # noqa: BLE001 - a value of the wrong type or shape fails the test
            return False


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def _decimal(token: str) -> bool:
    """Whether the token is written as a decimal number (a point or an exponent: printing may have rounded it)."""
    return any(c in token for c in ".eE") and any(c.isdigit() for c in token)


def outputs_match(got: str, expected: str) -> bool:
    """Whether a printed output matches the expected one (see the module docstring)."""
    def lines(text):
        return [ln.rstrip() for ln in str(text).strip().splitlines()]

    a, b = lines(got), lines(expected)
    if a == b:
        return True
    if len(a) != len(b):
        return False
    for la, lb in zip(a, b):
        ta, tb = la.split(), lb.split()
        if len(ta) != len(tb):
            return False
        for x, y in zip(ta, tb):
            if x == y:
                continue
            fx, fy = _number(x), _number(y)
            if fx is None or fy is None or not (_decimal(x) or _decimal(y)) or not math.isclose(
                    fx, fy, rel_tol=PRINTED_FLOAT_TOL, abs_tol=PRINTED_FLOAT_TOL):
                return False  # two integers that differ, or numbers out of tolerance
    return True
