"""Open a ``torch.export`` program (``.pt2``) without running anything it holds.

``torch.export.load`` has several ways to run code from the file (torch 2.13): weights and
constants flagged ``use_pickle`` (``torch.load(weights_only=False)``), sample inputs that fall
back to ``weights_only=False``, opaque and torchbind constants (``pickle.loads``), legacy
``weights/*.pt`` entries, AOTInductor shared libraries, symbolic shape expressions handed to
``sympy.sympify`` (which evaluates Python), ``guards_code`` that is ``exec``'d when the
program is turned into a module, and a retry that runs a failing payload twice.

``load_program`` reads the file once into memory, checks the archive, and only then hands
those same bytes to torch's archive reader:

* every entry must be one a plain program has (format markers, ``models/*.json``, raw weight
  and tensor-constant records with their JSON configs, sample inputs, ``extra/`` text);
  anything else (AOTInductor, ExecuTorch, legacy ``.pt`` weights, custom or opaque objects)
  is refused;
* no weight or constant may be flagged ``use_pickle``;
* the sample inputs are loaded here with ``weights_only=True`` (tensors and containers only),
  so torch's own load of them cannot fall back;
* every symbolic expression is parsed as a Python expression tree (not evaluated) and must be
  built only from sympy's integer/boolean constructors and torch's shape functions, with small
  literals;
* every graph node's target must be an operator of ``aten``, ``prims``, ``higher_order`` or this
  library, a symbolic-shape operator, or an ``operator``/``math`` function;
* ``guards_code`` is dropped before the program becomes a module (its input checks are
  Python source; shapes are checked again when the converted model runs).

Failures raise ``UnsafeProgramError`` (not a valid or not a plain program) naming the entry.
"""
from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from typing import Any

import torch

# Entries of a plain program, relative to the archive's root folder.
_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version",
          ".data/serialization_id"}
_PATTERNS = [re.compile(p) for p in (
    r"models/[\w.-]+\.json", r"data/weights/[\w.-]+_weights_config\.json",
    r"data/weights/weight_\d+", r"data/constants/[\w.-]+_constants_config\.json",
    r"data/constants/tensor_\d+", r"data/sample_inputs/[\w.-]+\.pt", r"extra/[^\x00]+")]
_LEGACY = re.compile(r"data/(weights|constants)/[\w.-]+\.pt")

# Names a shape expression may call or mention (sympy's srepr and torch's shape functions).
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "LessThan", "StrictGreaterThan",
    "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "true", "false", "oo",
    "Piecewise", "ExprCondPair", "floor", "ceiling", "Mod",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "BitwiseFn_bitwise_and",
    "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor", "OpaqueUnaryFn_sqrt", "True", "False",
    "None", "BooleanTrue", "BooleanFalse", "One", "Zero", "NegativeOne", "Infinity",
    "NegativeInfinity"}
_ASSUMPTIONS = {"positive", "integer", "real", "nonnegative", "negative", "nonpositive",
                "finite", "zero", "nonzero", "rational", "commutative", "evaluate"}
_POWERS = {"Pow", "PowByNatural", "FloatPow", "LShift"}
_SYMBOL = re.compile(r"[a-z]{1,3}\d{1,9}")  # s0, u12, zuf3: torch's shape symbols
_MAX_LITERAL = 2 ** 63
_MAX_EXPONENT = 64
_MAX_EXPR = 10_000

_OP_NAMESPACES = ("aten", "prims", "higher_order", "flurka_rewrite")  # + this library's ops
_DENIED_ATEN = {"from_file", "_nested_from_file"}  # read arbitrary files into tensors
_OPERATOR = {"add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "pow", "eq",
             "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "getitem",
             "abs", "lshift", "rshift"}
_MATH = {"ceil", "floor", "trunc", "sqrt"}


class UnsafeProgramError(ValueError):
    """A ``.pt2`` file that is not a plain ``torch.export`` program: it holds, or might run,
    something other than data (the message names the entry)."""


def _refuse(what: str) -> UnsafeProgramError:
    return UnsafeProgramError(f"{what}; flurka-rewrite opens only plain "
                              "programs (see Safety in docs/cli.md)")


# -- the checks ------------------------------------------------------------------------------
def _check_names(names: list[str]) -> str:
    """Every entry is one a plain program has; return the archive's root folder."""
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise _refuse("the archive does not hold one root folder, as torch.export.save writes")
    root = roots.pop()
    for name in names:
        rel = name[len(root) + 1:]
        if rel.endswith("/") or rel in _FIXED or any(p.fullmatch(rel) for p in _PATTERNS):
            continue
        if _LEGACY.fullmatch(rel):
            raise _refuse(f"entry {rel!r} is a legacy pickled weights/constants file, which "
                          "only unpickling can read")
        raise _refuse(f"entry {rel!r} is not part of a plain torch.export program (compiled "
                      "code, custom objects or an unknown format)")
    return root


def _check_payload(config: Any, where: str) -> None:
    """Weights and constants: raw tensor records only, never pickles or objects."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _refuse(f"{where} is not a payload config")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _refuse(f"{where}: {str(fqn)[:80]!r} is stored as a pickle (use_pickle), "
                          "which only unpickling can read")
        path = meta.get("path_name")
        if not isinstance(path, str) or not re.fullmatch(r"(weight|tensor)_\d+", path):
            raise _refuse(f"{where}: {str(fqn)[:80]!r} is stored as {str(path)[:80]!r}, not as "
                          "a raw tensor (custom or opaque objects are unpickled)")


def _check_expr(text: Any, where: str) -> None:
    """A shape expression: a tree of known sympy/torch constructors and small literals."""
    if not isinstance(text, str) or len(text) > _MAX_EXPR:
        raise _refuse(f"{where}: a shape expression that is not a short string")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise _refuse(f"{where}: shape expression {text[:80]!r} does not parse") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load, ast.keyword, ast.UnaryOp, ast.USub,
                             ast.UAdd, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Mod,
                             ast.FloorDiv, ast.Div, ast.Compare, ast.Eq, ast.NotEq, ast.Lt,
                             ast.LtE, ast.Gt, ast.GtE)):
            if isinstance(node, ast.keyword) and node.arg not in _ASSUMPTIONS:
                raise _refuse(f"{where}: shape expression {text[:80]!r} has keyword "
                              f"{node.arg!r}")
            continue
        if isinstance(node, ast.Call):
            func = node.func
            if not isinstance(func, ast.Name) or func.id not in _SYMPY_NAMES:
                raise _refuse(f"{where}: shape expression {text[:80]!r} calls something other "
                              "than sympy's and torch's shape functions")
            if func.id in _POWERS and len(node.args) == 2:
                exp = node.args[1]
                lit = exp.args[0] if isinstance(exp, ast.Call) and exp.args else exp
                if isinstance(lit, ast.Constant) and isinstance(lit.value, int) \
                        and abs(lit.value) > _MAX_EXPONENT:
                    raise _refuse(f"{where}: shape expression {text[:80]!r} raises to a power "
                                  f"above {_MAX_EXPONENT}")
            continue
        if isinstance(node, ast.Name):
            if node.id in _SYMPY_NAMES or _SYMBOL.fullmatch(node.id):
                continue
            raise _refuse(f"{where}: shape expression {text[:80]!r} names {node.id!r}")
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, (int, float)) and abs(v) < _MAX_LITERAL:
                continue
            if isinstance(v, str) and _SYMBOL.fullmatch(v):
                continue
            raise _refuse(f"{where}: shape expression {text[:80]!r} holds literal {v!r:.40}")
        raise _refuse(f"{where}: shape expression {text[:80]!r} uses "
                      f"{type(node).__name__}, which shape expressions never do")


def _check_target(target: Any, where: str) -> None:
    if not isinstance(target, str):
        raise _refuse(f"{where}: a node target that is not a string")
    parts = target.split(".")
    ok = False
    if parts[:2] == ["torch", "ops"] and len(parts) in (4, 5):
        ok = parts[2] in _OP_NAMESPACES and not (parts[2] == "aten" and parts[3] in _DENIED_ATEN)
    elif len(parts) == 2 and parts[0] == "torch":
        ok = parts[1].startswith(("sym_", "_sym_"))
    elif len(parts) == 2 and parts[0] == "_operator":
        ok = parts[1] in _OPERATOR
    elif len(parts) == 2 and parts[0] == "math":
        ok = parts[1] in _MATH
    if not ok:
        raise _refuse(f"{where}: node target {target[:80]!r} is not a tensor or shape operator "
                      "of aten, prims or higher_order")


def _check_program(obj: Any, where: str) -> None:
    """Walk a serialized program: every expression and every node target."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if "target" in o and "inputs" in o and "outputs" in o:
                _check_target(o["target"], where)
            for k, v in o.items():
                if k == "expr_str":
                    _check_expr(v, where)
                elif k == "range_constraints" and isinstance(v, dict):
                    for name in v:
                        if not (isinstance(name, str) and _SYMBOL.fullmatch(name)):
                            _check_expr(name, where)
                    stack.append(v)
                else:
                    stack.append(v)
        elif isinstance(o, list):
            stack.extend(o)


def _check_sample_inputs(data: bytes, where: str) -> None:
    if not data:
        return
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything but plain tensors and containers
        raise _refuse(f"{where}: the sample inputs hold objects other than tensors and plain "
                      f"containers ({type(e).__name__})") from None


def check_archive(data: bytes) -> dict[str, Any]:
    """Check the bytes of a ``.pt2`` archive (see the module docstring); return its parsed
    ``models/*.json`` programs. Raises ``UnsafeProgramError``."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UnsafeProgramError("not a zip archive: truncated or corrupt") from None
    with zf:
        names = zf.namelist()
        root = _check_names(names)
        programs = {}
        for name in names:
            rel = name[len(root) + 1:]
            if rel.endswith("/"):
                continue
            if rel.endswith("_config.json"):
                _check_payload(_json(zf, name), rel)
            elif rel.startswith("models/"):
                programs[rel] = program = _json(zf, name)
                _check_program(program, rel)
            elif rel.startswith("data/sample_inputs/"):
                _check_sample_inputs(zf.read(name), rel)
    if not programs:
        raise UnsafeProgramError("the archive holds no program (models/*.json)")
    return programs


def _json(zf: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(zf.read(name))
    except (ValueError, UnicodeDecodeError):
        raise UnsafeProgramError(f"entry {name!r} is not valid JSON: corrupt") from None


# -- the load --------------------------------------------------------------------------------
def load_program(path: str) -> torch.export.ExportedProgram:
    """Check the ``.pt2`` at ``path`` and load it once, with no code from the file run.
    Raises ``UnsafeProgramError`` (refused), ``OSError`` (unreadable) or torch's own error
    (a valid archive that torch cannot deserialize)."""
    with open(path, "rb") as f:  # a bytes path or any file name works here
        data = f.read()
    programs = check_archive(data)
    if any('"transformers.' in json.dumps(p) for p in programs.values()):
        try:  # ModelOutput pytree classes register themselves on import
            import transformers.modeling_outputs  # noqa: F401
        except ImportError:
            pass
    from torch.export.pt2_archive._package import load_pt2

    contents = load_pt2(io.BytesIO(data))
    if "model" not in contents.exported_programs:
        raise UnsafeProgramError("the archive holds no program named 'model'")
    ep = contents.exported_programs["model"]
    ep._guards_code = []  # Python source from the file: never exec'd
    return ep
