"""A ``_target_``'s keyword arguments, their types and its argument checks, read from source.

``signature_of("pse_lightning.attacks.PGD")`` parses the class (and the bases its
``**kwargs`` reach) with :mod:`ast`, so a config can be checked against what the
constructor accepts before torch is imported. The constructor's own
``require_*("attack.steps", steps, 1)`` calls are collected too, so a range error is
raised by the same function, with the same bounds, seconds earlier and under the full key
path (``analysis.pse.steps``, where the class only knows ``analysis.steps``).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from pse_lightning.cli.source import NO_VALUE, Source, literal, locate, resolve_expr

#: A condition on one parameter under which a check runs: (param, operator, literal).
Guard = tuple[str, type[ast.cmpop], object]
_NEGATE: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}


@dataclass(frozen=True)
class Param:
    """One keyword argument: its annotation and default as written in ``source``."""

    name: str
    annotation: ast.expr | None
    default: ast.expr | None
    source: Source | None


@dataclass(frozen=True)
class Check:
    """A ``require_*(key, param, *args)`` call of a constructor, re-run on config values."""

    function: str
    param: str
    args: tuple[ast.expr, ...]
    keywords: tuple[tuple[str, ast.expr], ...]
    guards: tuple[Guard, ...]
    source: Source

    def names(self) -> set[str]:
        """Every parameter the check reads (its value, its bounds, its guards)."""
        used = {self.param} | {g[0] for g in self.guards}
        exprs = [*self.args, *(v for _, v in self.keywords)]
        return used | {n.id for e in exprs for n in ast.walk(e) if isinstance(n, ast.Name)}


@dataclass
class Signature:
    """What a ``_target_`` accepts. ``open``: it takes any keyword (unknown ``**kwargs``)."""

    target: str
    params: dict[str, Param] = field(default_factory=dict)
    open: bool = False
    checks: list[Check] = field(default_factory=list)


@dataclass(frozen=True)
class _Method:
    """A method as found in a class hierarchy: its module, itself, its class."""

    source: Source
    fn: ast.FunctionDef
    cls: ast.ClassDef


@functools.cache
def signature_of(target: str) -> Signature | None:
    """The signature of ``target``, or None when its source cannot be read."""
    found = locate(target)
    if found is None or not isinstance(found.node, (ast.ClassDef, ast.FunctionDef)):
        return None
    signature = Signature(target)
    if isinstance(found.node, ast.ClassDef):
        _read_class(found.source, found.node, signature, depth=0)
    else:
        _read_function(found.source, found.node, signature, depth=0)
    return signature


def _read_class(src: Source, cls: ast.ClassDef, out: Signature, depth: int) -> None:
    init = _find_method(src, cls, "__init__", include_self=True)
    if init is not None:
        _read_function(init.source, init.fn, out, depth, init.cls)
    elif cls.bases:
        out.open = True  # a base we cannot read may take anything


def _read_function(
    src: Source,
    fn: ast.FunctionDef,
    out: Signature,
    depth: int,
    cls: ast.ClassDef | None = None,
) -> None:
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = [
        *zip(positional, defaults, strict=True),
        *zip(args.kwonlyargs, args.kw_defaults, strict=True),
    ]
    own = {
        a.arg: Param(a.arg, a.annotation, d, src) for a, d in pairs if a.arg not in ("self", "cls")
    }
    out.params.update(own)
    out.checks += _checks(src, fn.body, own, ())
    calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)]
    kwargs = args.kwarg.arg if args.kwarg is not None else None
    merged = set()
    for call in calls if cls is not None and depth < 10 else []:
        method = _called_method(src, cls, call)
        if method is not None:
            _merge_call(method, call, out, depth, with_params=_forwards(call, kwargs))
            merged.add(id(call))
    if kwargs is None:
        return
    for name, default in _popped(fn, kwargs):
        out.params.setdefault(name, Param(name, None, default, src))
    # **kwargs handed to anything but a method we read may take any key; read only by
    # pop/get (torchmetrics.Metric), it takes nothing else.
    if any(_forwards(c, kwargs) for c in calls if id(c) not in merged):
        out.open = True


def _popped(fn: ast.FunctionDef, kwargs: str) -> list[tuple[str, ast.expr | None]]:
    """Keys read with ``kwargs.pop("key", default)`` or ``kwargs.get``."""
    found = []
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == kwargs
            and node.func.attr in ("pop", "get")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value, node.args[1] if len(node.args) > 1 else None))
    return found


def _forwards(call: ast.Call, kwargs: str | None) -> bool:
    """Whether ``call`` passes ``**kwargs`` on."""
    return kwargs is not None and any(
        k.arg is None and isinstance(k.value, ast.Name) and k.value.id == kwargs
        for k in call.keywords
    )


def _called_method(src: Source, cls: ast.ClassDef, call: ast.Call) -> _Method | None:
    """The method ``super().__init__(...)`` or ``self.name(...)`` runs, found in the class
    hierarchy as far as its source can be read."""
    func = call.func
    if not isinstance(func, ast.Attribute):
        return None
    owner = func.value
    if (
        func.attr == "__init__"
        and isinstance(owner, ast.Call)
        and isinstance(owner.func, ast.Name)
        and owner.func.id == "super"
    ):
        return _find_method(src, cls, "__init__", include_self=False)
    if isinstance(owner, ast.Name) and owner.id == "self":
        return _find_method(src, cls, func.attr, include_self=True)
    return None


def _find_method(
    src: Source, cls: ast.ClassDef, name: str, include_self: bool, depth: int = 0
) -> _Method | None:
    if include_self:
        for node in cls.body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                return _Method(src, node, cls)
    for base in cls.bases if depth < 10 else []:
        found = resolve_expr(src, base)
        if found is not None and isinstance(found.node, ast.ClassDef):
            method = _find_method(found.source, found.node, name, True, depth + 1)
            if method is not None:
                return method
    return None


def _merge_call(
    method: _Method, call: ast.Call, out: Signature, depth: int, with_params: bool
) -> None:
    """Add the checks of a method ``__init__`` calls on what the call passes through
    unchanged, and with ``**kwargs`` passed on, the method's parameters. A parameter the
    caller sets itself (``norm=None``) is not a key of the caller, and checks that read it
    do not apply."""
    inner = Signature(out.target)
    _read_function(method.source, method.fn, inner, depth + 1, method.cls)
    fixed = {
        k.arg
        for k in call.keywords
        if k.arg is not None and not (isinstance(k.value, ast.Name) and k.value.id == k.arg)
    }
    passed = {k.arg for k in call.keywords if k.arg is not None}
    if with_params:
        for name, param in inner.params.items():
            if name not in passed:
                out.params.setdefault(name, param)
        out.open = out.open or inner.open
    out.checks += [c for c in inner.checks if not c.names() & fixed]


def _checks(
    src: Source, body: list[ast.stmt], params: Mapping[str, Param], guards: tuple[Guard, ...]
) -> list[Check]:
    """The ``require_*`` calls among ``body``'s statements, with the ``if`` conditions on
    parameters that lead to them; a condition on anything else hides its branch."""
    found: list[Check] = []
    for stmt in body:
        if isinstance(stmt, ast.If):
            branches = _branches(src, stmt.test, params, guards)
            if branches is not None:
                found += _checks(src, stmt.body, params, branches[0])
                found += _checks(src, stmt.orelse, params, branches[1])
            continue
        value = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, ast.IfExp):
            branches = _branches(src, value.test, params, guards)
            if branches is not None:
                found += _call_check(src, value.body, params, branches[0])
                found += _call_check(src, value.orelse, params, branches[1])
        elif value is not None:
            found += _call_check(src, value, params, guards)
    return found


def _branches(
    src: Source, test: ast.expr, params: Mapping[str, Param], guards: tuple[Guard, ...]
) -> tuple[tuple[Guard, ...], tuple[Guard, ...]] | None:
    """The guards of the true and the false branch of ``if test``, or None when the test
    is not a comparison of a parameter with a literal."""
    guard = _guard(src, test, params)
    if guard is None:
        return None
    negated = (guard[0], _NEGATE[guard[1]], guard[2])
    return (*guards, guard), (*guards, negated)


def _guard(src: Source, test: ast.expr, params: Mapping[str, Param]) -> Guard | None:
    if (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and type(test.ops[0]) in _NEGATE
        and isinstance(test.left, ast.Name)
        and test.left.id in params
    ):
        value = literal(src, test.comparators[0])
        if value is not NO_VALUE:
            return (test.left.id, type(test.ops[0]), value)
    return None


def _call_check(
    src: Source, node: ast.expr, params: Mapping[str, Param], guards: tuple[Guard, ...]
) -> list[Check]:
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id.startswith("require_")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Name)
        and node.args[1].id in params
    ):
        return []
    origin = resolve_expr(src, node.func)
    if origin is None or origin.source.name != "pse_lightning.validation":
        return []
    keywords = tuple((k.arg, k.value) for k in node.keywords if k.arg is not None)
    return [Check(node.func.id, node.args[1].id, tuple(node.args[2:]), keywords, guards, src)]


def evaluate(check: Check, values: Mapping[str, object]) -> tuple[list, dict] | None:
    """The arguments after the value for re-running ``check`` on config ``values`` (None when
    a guard is false or an argument is not a literal)."""
    for name, op, expected in check.guards:
        if not _holds(values.get(name, NO_VALUE), op, expected):
            return None

    def value_of(expr: ast.expr) -> object:
        if isinstance(expr, ast.Name) and expr.id in values:
            return values[expr.id]
        return literal(check.source, expr)

    args = [value_of(a) for a in check.args]
    keywords = {k: value_of(v) for k, v in check.keywords}
    if any(v is NO_VALUE for v in [*args, *keywords.values()]):
        return None
    return args, keywords


def _holds(value: object, op: type[ast.cmpop], expected: object) -> bool:
    if value is NO_VALUE:
        return False
    try:
        return {
            ast.Is: lambda: value is expected,
            ast.IsNot: lambda: value is not expected,
            ast.Eq: lambda: value == expected,
            ast.NotEq: lambda: value != expected,
            ast.In: lambda: value in expected,  # type: ignore[operator]
            ast.NotIn: lambda: value not in expected,  # type: ignore[operator]
        }[op]()
    except TypeError:
        return False
