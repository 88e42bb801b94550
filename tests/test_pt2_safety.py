"""Hostile ``.pt2`` files: an archive crafted for each way torch.export.load can run code
(pickled weights, sample inputs that fall back to full unpickling, opaque constants, legacy
pickled weights, AOTInductor libraries, shape expressions given to sympify, guards_code, a
node that calls an arbitrary torch function). Opening one with the CLI's defaults must run
nothing (the payload writes a marker file) and exit 4; a plain program still converts.

Oracle: the marker file. Each payload is first shown to run under torch.export.load itself
(``test_payloads_are_live``), so a test that passes is not one whose payload is inert."""
from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Callable

import pytest
import torch

from flurka_rewrite.cli import main
from flurka_rewrite.demo import export_demo
from flurka_rewrite.pt2_safe import UnsafeProgramError, check_archive


class Payload:
    """Unpickling it appends one line to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'a').write('ran\\n')",))


def _pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _model_json(files: dict[str, bytes]) -> str:
    return next(n for n in files if "/models/" in n)


def _edit_json(files: dict[str, bytes], name: str, edit: Callable[[dict], None]) -> None:
    obj = json.loads(files[name])
    edit(obj)
    files[name] = json.dumps(obj).encode()


def _root(files: dict[str, bytes]) -> str:
    return next(iter(files)).split("/", 1)[0]


def pickled_weight(files: dict[str, bytes], marker: str) -> None:
    root = _root(files)
    cfg = f"{root}/data/weights/model_weights_config.json"

    def edit(c: dict) -> None:
        meta = next(iter(c["config"].values()))
        meta["use_pickle"] = True
        files[f"{root}/data/weights/{meta['path_name']}"] = _pickle(Payload(marker))
    _edit_json(files, cfg, edit)


def sample_inputs(files: dict[str, bytes], marker: str) -> None:
    files[f"{_root(files)}/data/sample_inputs/model.pt"] = _pickle(((Payload(marker),), {}))


def opaque_constant(files: dict[str, bytes], marker: str) -> None:
    root = _root(files)
    import pickle

    files[f"{root}/data/constants/opaque_obj_0"] = pickle.dumps(Payload(marker))
    _edit_json(files, f"{root}/data/constants/model_constants_config.json",
               lambda c: c["config"].update({"evil": {"path_name": "opaque_obj_0",
                                                      "is_param": False, "use_pickle": False,
                                                      "tensor_meta": None}}))


def legacy_weights(files: dict[str, bytes], marker: str) -> None:
    root = _root(files)
    files[f"{root}/data/weights/model.pt"] = _pickle(Payload(marker))


def aoti_library(files: dict[str, bytes], marker: str) -> None:
    files[f"{_root(files)}/data/aotinductor/model/model.so"] = b"\x7fELF not really"


def sympy_expression(files: dict[str, bytes], marker: str) -> None:
    code = f"__import__('builtins').exec(\"open({marker!r}, 'a').write('ran\\\\n')\") or 3"

    def edit(p: dict) -> None:
        for tv in p["graph_module"]["graph"]["tensor_values"].values():
            for s in tv["sizes"]:
                if "as_expr" in s:
                    s["as_expr"]["expr_str"] = code
                    return
        raise AssertionError("the program has no symbolic size to tamper with")
    _edit_json(files, _model_json(files), edit)


def guards_code(files: dict[str, bytes], marker: str) -> None:
    _edit_json(files, _model_json(files), lambda p: p.update(
        guards_code=[f"open({marker!r}, 'a').write('ran\\n') is None"]))


def node_target(files: dict[str, bytes], marker: str) -> None:
    def edit(p: dict) -> None:
        node = p["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.serialization.load"
    _edit_json(files, _model_json(files), edit)


ATTACKS = {f.__name__: f for f in (pickled_weight, sample_inputs, opaque_constant,
                                   legacy_weights, aoti_library, sympy_expression, guards_code,
                                   node_target)}


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A plain program of the demo transformer (two attention sites, dynamic shapes)."""
    path = str(tmp_path_factory.mktemp("pt2") / "demo.pt2")
    export_demo(path, batch=2, seq_len=24)
    return path


def craft(program: str, attack: str, tmp_path, marker: str) -> str:
    with zipfile.ZipFile(program) as z:
        files = {n: z.read(n) for n in z.namelist()}
    ATTACKS[attack](files, marker)
    out = str(tmp_path / f"{attack}.pt2")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out


LIVE = ["pickled_weight", "sample_inputs", "legacy_weights", "sympy_expression", "guards_code"]


@pytest.mark.parametrize("attack", LIVE)
def test_payloads_are_live(attack: str, program: str, tmp_path) -> None:
    """torch.export.load (and calling the program) runs these payloads: the attacks are real."""
    marker = str(tmp_path / "ran")
    path = craft(program, attack, tmp_path, marker)
    try:
        ep = torch.export.load(path)
        ep.module()(input_ids=torch.zeros(2, 24, dtype=torch.long),
                        attention_mask=torch.ones(2, 24, dtype=torch.long))
    except Exception:  # noqa: BLE001 - the payload may break the load after it ran
        pass
    assert os.path.exists(marker), f"{attack}: payload did not run under torch.export.load"


@pytest.mark.parametrize("attack", sorted(set(ATTACKS) - {"guards_code"}))
def test_hostile_program_runs_nothing_and_exits_4(attack: str, program: str, tmp_path,
                                                  capsys) -> None:
    marker = str(tmp_path / "ran")
    path = craft(program, attack, tmp_path, marker)
    code = main([path, "--dry-run", "--dk", "8"])
    err = capsys.readouterr().err
    assert not os.path.exists(marker), f"{attack}: code from the file ran"
    assert code == 4, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "--trust-pickle" in errors[0], err


def test_guards_code_is_dropped_never_run(program: str, tmp_path, capsys) -> None:
    """guards_code is Python source; legitimate programs carry it too (input shape checks),
    so it is dropped, not refused: the conversion runs and the payload does not."""
    marker = str(tmp_path / "ran")
    path = craft(program, "guards_code", tmp_path, marker)
    code = main([path, "-o", str(tmp_path / "out.pt2"), "--dk", "8", "-q"])
    assert code == 0, capsys.readouterr().err
    assert not os.path.exists(marker)


def test_plain_program_still_converts(program: str, tmp_path, capsys) -> None:
    code = main([program, "-o", str(tmp_path / "out.pt2"), "--dk", "8", "-q"])
    assert code == 0, capsys.readouterr().err
    assert os.path.getsize(tmp_path / "out.pt2") > 0


def test_failed_trusted_load_runs_the_payload_once(program: str, tmp_path, capsys) -> None:
    """With --trust-pickle the file's pickles run, but a failing load is not retried."""
    marker = str(tmp_path / "ran")
    path = craft(program, "legacy_weights", tmp_path, marker)
    main([path, "--dry-run", "--dk", "8", "--trust-pickle"])
    capsys.readouterr()
    with open(marker) as f:
        assert f.read() == "ran\n"


@pytest.mark.parametrize("expr", ["Symbol('s27', positive=True, integer=True)",
                                  "Mul(Integer(8), Symbol('s27', positive=True, integer=True))",
                                  "Max(2, s0) + FloorDiv(s1, 2)"])
def test_plain_shape_expressions_pass(expr: str) -> None:
    from flurka_rewrite.pt2_safe import _check_expr
    _check_expr(expr, "x")


@pytest.mark.parametrize("expr", ["s0.__class__", "Pow(Integer(10), Integer(10000000000))",
                                  "Symbol('a; import os')", "lambda: 0", "[1][0]",
                                  "Integer(10**30)", "eval('1')"])
def test_hostile_shape_expressions_are_refused(expr: str) -> None:
    from flurka_rewrite.pt2_safe import _check_expr
    with pytest.raises(UnsafeProgramError):
        _check_expr(expr, "x")


def test_not_a_zip_is_refused() -> None:
    with pytest.raises(UnsafeProgramError, match="not a zip"):
        check_archive(b"PK\x03\x04 garbage")


def test_non_utf8_file_name_loads(program: str, tmp_path, capsys) -> None:
    """A valid program whose name is not UTF-8 is read, not reported as corrupt, and the
    name is printed escaped."""
    name = os.path.join(os.fsencode(str(tmp_path)), b"mod\xffel.pt2")
    with open(program, "rb") as src, open(name, "wb") as dst:
        dst.write(src.read())
    code = main([os.fsdecode(name), "--dry-run", "--dk", "8"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "\\udcff" in out.err or "\\xff" in out.err


def test_program_with_this_librarys_custom_op_loads(tmp_path) -> None:
    """A converted model exported on the Triton backend holds torch.ops.flurka_rewrite ops (a
    GPU export does): such a program is plain data and loads, and runs like the original."""
    from flurka_rewrite.kernels.attention import FlurkaAttention
    from flurka_rewrite.pt2_safe import load_program

    torch.manual_seed(0)
    attn = FlurkaAttention(kernel="relu", heads=2, head_dim=8, dk=None, backend="triton").eval()
    q, k, v = (torch.randn(2, 2, 12, 8) for _ in range(3))
    ep = torch.export.export(attn, (q, k, v))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("flurka_rewrite" in t for t in targets), targets  # the case under test
    path = str(tmp_path / "op.pt2")
    torch.export.save(ep, path)
    with torch.no_grad():
        got = load_program(path).module()(q, k, v)
        torch.testing.assert_close(got, attn(q, k, v), atol=1e-5, rtol=1e-5)
