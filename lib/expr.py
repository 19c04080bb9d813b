"""`--filter`: a small predicate language, compiled to a pyarrow.compute expression.

The text is parsed by Python's own parser (`ast.parse(mode="eval")`) and only the node types below are
translated; nothing is ever evaluated as Python, so a filter cannot run code. The expression then runs
vectorised inside Arrow.

    len(text) >= 50 and section == "games"
    section in ["games", "libs"] and not (package == "0ad")
    10 < len(text) <= 2000 or lower(section) != "misc"
    startswith(package, "lib") and contains(text, "JSON")

Values: column names (`col("odd name")` for names that are not identifiers), numbers, quoted strings,
True/False/None, lists for `in`. Operators: comparisons (chains allowed), `in`/`not in`, `is None`,
`and`/`or`/`not`, `+ - * /`. Functions: len (characters of text, items of a list), lower, upper, strip,
startswith, endswith, contains (plain substring), matches (regular expression).
A row where the predicate is null (a missing value) is dropped.
"""

from __future__ import annotations

import ast

import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError

_COMPARE = {ast.Eq: "equal", ast.NotEq: "not_equal", ast.Lt: "less", ast.LtE: "less_equal",
            ast.Gt: "greater", ast.GtE: "greater_equal"}
_ARITH = {ast.Add: "add", ast.Sub: "subtract", ast.Mult: "multiply", ast.Div: "divide"}
_ONE_ARG = {"lower": pc.utf8_lower, "upper": pc.utf8_upper, "strip": pc.utf8_trim_whitespace}
_PATTERN = {"startswith": pc.starts_with, "endswith": pc.ends_with, "contains": pc.match_substring,
            "matches": pc.match_substring_regex}
FUNCTIONS = ["len", *_ONE_ARG, *_PATTERN, "col"]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_KIND = {bool: "booleans", int: "numbers", float: "numbers", str: "strings"}


class FilterError(InputError):
    pass


def compile_filter(text: str, schema: pa.Schema) -> tuple[pc.Expression, set[str]]:
    """The expression for `text` and the columns it uses, checked against `schema` (names and types)
    before any row is read, so a typo fails in the first second of a long job, not at the end."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
        compiler = _Compiler(text, schema)
        expression = compiler.visit(tree.body)
    except SyntaxError as exc:
        raise FilterError(f"--filter {text!r}: invalid syntax at column {exc.offset}: {exc.msg}")
    except (RecursionError, MemoryError):  # (Python's parser and this compiler both recurse per level)
        raise FilterError(f"--filter {_short(text)}: nested too deeply; write it with fewer levels")
    try:  # types: run it on no rows (e.g. len() of a number fails here)
        schema.empty_table().filter(expression)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError) as exc:
        raise FilterError(f"--filter {text!r}: {str(exc).splitlines()[0]}")
    return expression, compiler.used


def _as_float(expression) -> pc.Expression:
    return expression.cast(pa.float64(), safe=False)  # (rounds integers beyond 2**53, as Python's float() does)


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


class _Compiler:
    def __init__(self, text: str, schema: pa.Schema):
        self.text, self.schema, self.columns = text, schema, schema.names
        self.used: set[str] = set()

    def fail(self, node, message: str):
        snippet = ast.get_source_segment(self.text.strip(), node) or ""
        raise FilterError(f"--filter {self.text!r}: {message}" + (f" (at `{snippet}`)" if snippet else ""))

    def visit(self, node):
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            self.fail(node, f"{type(node).__name__} is not supported; use comparisons, and/or/not, in [...], "
                            f"numbers, quoted strings and the functions {', '.join(FUNCTIONS)}")
        return method(node)

    def column(self, node, name: str):
        if name not in self.columns:
            self.fail(node, f"no column {name!r}; available: {', '.join(self.columns)}")
        self.used.add(name)
        return pc.field(name)

    def type_of(self, expression) -> pa.DataType | None:
        """The type `expression` has on the schema's columns (None where it is itself ill-typed: the check
        on no rows reports that)."""
        import pyarrow.dataset as ds

        try:
            return ds.dataset(self.schema.empty_table()).to_table(columns={"v": expression}).schema.field(0).type
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError):
            return None

    def visit_Name(self, node):
        return self.column(node, node.id)

    def visit_Constant(self, node):
        return pc.scalar(self.literal(node))

    def literal(self, node):
        value = node.value
        if not isinstance(value, (int, float, str, bool, type(None))):
            self.fail(node, f"the literal {value!r} is not supported")
        if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            self.fail(node, "the number does not fit in 64 bits (write it as a float, like 1e30, if it must be that "
                            "large)")
        return value

    def visit_BoolOp(self, node):
        parts = [self.visit(v) for v in node.values]
        result = parts[0]
        for part in parts[1:]:
            result = (result & part) if isinstance(node.op, ast.And) else (result | part)
        return result

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.Not):
            return ~self.visit(node.operand)
        if isinstance(node.op, ast.USub):
            operand = node.operand
            if isinstance(operand, ast.Constant) and type(operand.value) in (int, float):  # -2**63 fits
                return pc.scalar(self.literal(ast.copy_location(ast.Constant(-operand.value), node)))
            return pc.negate(self.visit(operand))
        self.fail(node, "only `not` and `-` work on one value")

    def visit_BinOp(self, node):
        name = _ARITH.get(type(node.op))
        if name is None:
            self.fail(node, "only + - * / are supported")
        left, right = self.visit(node.left), self.visit(node.right)
        if name == "divide":  # Python's true division, in floats: x / 0 is inf, not an error in mid-job
            if isinstance(node.right, ast.Constant) and node.right.value == 0:
                self.fail(node, "division by zero")
            for side, value in ((node.left, left), (node.right, right)):
                kind = self.type_of(value)
                if kind is not None and not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                    self.fail(side, f"/ divides numbers, and this is {kind}")
            return pc.divide(_as_float(left), _as_float(right))
        return getattr(pc, name)(*self.common(left, right))

    def common(self, left, right) -> tuple:
        """An integer and a float as two floats: Arrow would cast the integers safely, to float32 even, and
        fail in mid-job on the first one beyond 2**24. (Python's float comparison rounds, as this does.)"""
        kinds = [self.type_of(left), self.type_of(right)]
        if all(k is not None and (pa.types.is_integer(k) or pa.types.is_floating(k)) for k in kinds) \
                and any(pa.types.is_integer(k) for k in kinds) and any(pa.types.is_floating(k) for k in kinds):
            return _as_float(left), _as_float(right)
        return left, right

    def visit_Compare(self, node):
        result, left = None, node.left
        for op, right in zip(node.ops, node.comparators):  # a < b <= c  ==  a < b and b <= c
            if isinstance(op, (ast.In, ast.NotIn)):
                test = self.visit(left).isin(self.literal_list(right))
                test = ~test if isinstance(op, ast.NotIn) else test
            elif isinstance(op, (ast.Is, ast.IsNot)):
                if not (isinstance(right, ast.Constant) and right.value is None):
                    self.fail(node, "`is` only compares with None")
                test = self.visit(left).is_null()
                test = ~test if isinstance(op, ast.IsNot) else test
            else:
                test = getattr(pc, _COMPARE[type(op)])(*self.common(self.visit(left), self.visit(right)))
            result = test if result is None else result & test
            left = right
        return result

    def literal_list(self, node) -> pa.Array:
        if not isinstance(node, (ast.List, ast.Tuple, ast.Set)) or \
                not all(isinstance(e, ast.Constant) for e in node.elts):
            self.fail(node, "`in` needs a list of literals, like section in [\"games\", \"libs\"]")
        values = [self.literal(e) for e in node.elts]
        kinds = {_KIND[type(v)] for v in values if v is not None}
        if len(kinds) > 1:
            self.fail(node, f"the list mixes {' and '.join(sorted(kinds))}; give values of one kind")
        try:
            return pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            self.fail(node, str(exc).splitlines()[0])

    def visit_Call(self, node):
        if isinstance(node.func, ast.Attribute):
            self.fail(node, f"methods are not supported: write {node.func.attr}(value), not value.{node.func.attr}()")
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS or node.keywords:
            self.fail(node, f"unknown function; available: {', '.join(FUNCTIONS)}")
        args = node.args
        if name == "col":
            if len(args) != 1 or not isinstance(args[0], ast.Constant) or not isinstance(args[0].value, str):
                self.fail(node, 'col() takes one quoted column name: col("my column")')
            return self.column(node, args[0].value)
        if name in _PATTERN:
            if len(args) != 2 or not isinstance(args[1], ast.Constant) or not isinstance(args[1].value, str):
                self.fail(node, f'{name}() takes a value and a quoted pattern: {name}(text, "abc")')
            if name == "matches":  # RE2 compiles a pattern on first use: compile it now, not in mid-job
                try:
                    pc.match_substring_regex(pa.array([""]), pattern=args[1].value)
                except pa.ArrowInvalid as exc:
                    self.fail(node, f"{str(exc).splitlines()[0]} (RE2 syntax)")
            return _PATTERN[name](self.visit(args[0]), pattern=args[1].value)
        if len(args) != 1:
            self.fail(node, f"{name}() takes one value")
        value = self.visit(args[0])
        if name == "len":  # expressions cannot branch on type: decide here, from the column's type
            column = args[0].id if isinstance(args[0], ast.Name) else None
            is_list = column is not None and pa.types.is_list(self.schema.field(column).type)
            return pc.list_value_length(value) if is_list else pc.utf8_length(value)
        return _ONE_ARG[name](value)
