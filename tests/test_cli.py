"""The CLI: exit codes and one-line errors for bad inputs, safe writes, and round trips on the
embedded demo model through the real compiler."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn

from flurka_rewrite.cli import EXIT_CODES, main
from flurka_rewrite.demo import build_demo_model, demo_inputs, export_demo, rel_error
from flurka_rewrite.example_inputs import example_inputs_for
from flurka_rewrite.io import LoadedModel, load_model
from flurka_rewrite.report import RewriteReport, SiteReport

HAS_COMPILER = importlib.util.find_spec("flurka_rewrite.convert") is not None
needs_compiler = pytest.mark.skipif(
    not HAS_COMPILER, reason="flurka_rewrite.convert (the compiler) does not exist yet")

# The demo model has two attention layers: the true number of sites.
DEMO_SITES = 2
# Sequence lengths that are not powers of two.
N_EXAMPLE = 100


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Model files, good and bad, shared by the tests of this module (written once; the
    demo's torch.export program is a separate fixture, it takes seconds)."""
    d = tmp_path_factory.mktemp("models")
    f = {name: str(d / name) for name in (
        "full.pt", "state_dict.pt", "truncated.pt2", "truncated.pt", "junk.pt", "mlp.pt2",
        "weights.safetensors")}
    model = build_demo_model()
    torch.save(model, f["full.pt"])
    torch.save(model.state_dict(), f["state_dict.pt"])
    mlp = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 3))
    torch.export.save(torch.export.export(mlp, (torch.randn(2, 7, 12),)), f["mlp.pt2"])
    for src, dst in (("mlp.pt2", "truncated.pt2"), ("full.pt", "truncated.pt")):
        data = open(f[src], "rb").read()
        open(f[dst], "wb").write(data[: len(data) // 2])
    open(f["junk.pt"], "wb").write(bytes(range(256)) * 8)
    open(f["weights.safetensors"], "wb").write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return f


@pytest.fixture(scope="module")
def demo_pt2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo model as a torch.export program (dynamic batch and sequence)."""
    path = str(tmp_path_factory.mktemp("demo") / "demo.pt2")
    export_demo(path, batch=2, seq_len=N_EXAMPLE)
    return path


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def fake_compiler(sites: list[SiteReport] | None = None, exc: Exception | None = None):
    """A stand-in ``flurka_rewrite.convert`` module, to test how the CLI maps what the compiler
    does (an empty report, an exception) onto exit codes, independently of the compiler."""
    mod = types.ModuleType("flurka_rewrite.convert")

    def plan(model: nn.Module, **options) -> RewriteReport:
        if exc is not None:
            raise exc
        return RewriteReport(model=type(model).__name__, sites=list(sites or []))

    def convert(model: nn.Module, **options) -> nn.Module:
        new = copy.deepcopy(model)
        new.flurka_report = plan(model, **options)
        return new

    mod.plan, mod.convert = plan, convert
    return mod


ONE_SITE = [SiteReport(path="blocks.0.attn:softmax", pattern="matmul-div-softmax-matmul",
                       status="rewritten", kernel="relu", dk=32)]


def test_help_lists_every_exit_code(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for code, meaning in EXIT_CODES.items():
        assert f"{code:>3}  {meaning}" in out
    assert "--trust-pickle" in out and "weights_only=False" in out


def test_error_from_a_real_process_is_one_line(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "flurka_rewrite.cli", str(tmp_path / "nope.pt2"),
                           "-o", str(tmp_path / "out.pt2")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("flurka-rewrite: error")]
    assert len(errors) == 1 and "does not exist" in errors[0]
    assert "Traceback" not in proc.stderr


BAD = {
    # id: (argv with {placeholders}, exit code, words the message must contain)
    "missing-file": (["{tmp}/absent.pt2", "-o", "{tmp}/o.pt2"], 3, "does not exist"),
    "truncated-pt2": (["{truncated.pt2}", "-o", "{tmp}/o.pt2"], 3, "truncated or corrupt"),
    "truncated-pt": (["{truncated.pt}", "-o", "{tmp}/o.pt2"], 3, "truncated or corrupt"),
    "junk-bytes": (["{junk.pt}", "-o", "{tmp}/o.pt2"], 3, "not a readable PyTorch file"),
    "state-dict": (["{state_dict.pt}", "-o", "{tmp}/o.pt2"], 5, "holds a state_dict"),
    "safetensors-file": (["{weights.safetensors}", "-o", "{tmp}/o.pt2"], 5, "only weights"),
    "pickle-refused": (["{full.pt}", "-o", "{tmp}/o.pt2"], 4, "--trust-pickle"),
    "output-exists": (["{mlp.pt2}", "-o", "{full.pt}"], 8, "pass --force"),
    "output-is-input": (["{mlp.pt2}", "-o", "{mlp.pt2}", "--force"], 8, "never overwrites"),
    "dk-zero": (["--demo", "-o", "{tmp}/o.pt2", "--dk", "0"], 2, "dk must be a positive"),
    "dk-not-a-number": (["--demo", "-o", "{tmp}/o.pt2", "--dk", "big"], 2, "--dk must be"),
    # (--dk at or above the sequence length warns, as the API does: tests/test_cli_guide.py)
    "unknown-kernel": (["--demo", "-o", "{tmp}/o.pt2", "--kernel", "favor"], 2,
                       "unknown kernel 'favor'; expected one of performer"),
    "unknown-backend": (["--demo", "-o", "{tmp}/o.pt2", "--backend", "cuda"], 2,
                        "unknown backend"),
    "bad-shape": (["--demo", "-o", "{tmp}/o.pt2", "--example-shape", "2x63"], 2, "B,N"),
    "empty-shape": (["--demo", "-o", "{tmp}/o.pt2", "--example-shape", ""], 2, "B,N"),
    "huge-seed": (["--demo", "-o", "{tmp}/o.pt2", "--seed", str(2 ** 70)], 2, "seed must be"),
    "unknown-flag": (["--demo", "-o", "{tmp}/o.pt2", "--fast"], 2, "unrecognized"),
    "no-output": (["--demo"], 2, "-o OUTPUT is required"),
    "bad-output-suffix": (["--demo", "-o", "{tmp}/o.txt"], 2, "unsupported output"),
    "input-and-demo": (["{mlp.pt2}", "--demo", "-o", "{tmp}/o.pt2"], 2, "exactly one of"),
    # (the output may not lie inside an input directory: exit 8, tested in test_cli_safety)
    "not-a-model-dir": (["{models}", "-o", "{tmp}/o.pt2"], 3, "no config.json"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_gives_its_exit_code_and_one_line(case: str, files, tmp_path, capsys) -> None:
    argv, code, words = BAD[case]
    names = {"{tmp}": str(tmp_path), "{models}": os.path.dirname(files["mlp.pt2"]),
             **{"{" + k + "}": v for k, v in files.items()}}
    argv = [a.replace(a[a.find("{"):a.find("}") + 1], names.get(a[a.find("{"):a.find("}") + 1],
                                                               "")) if "{" in a else a
            for a in argv]
    before = sorted(os.listdir(tmp_path))
    rc, out, err = run_cli(capsys, *argv, "-q")
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flurka-rewrite: error:"), err
    assert words in lines[0]
    assert "Traceback" not in err and out == ""
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_directory_and_onnx_outputs(tmp_path, capsys) -> None:
    """-o DIR writes a flurka_rewrite.save directory and --onnx an ONNX file; both reload and
    reproduce the converted model. Oracles: the saved directory's own model (fr.load with the
    demo's base model) and onnxruntime, against the converted model on the same inputs."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    import flurka_rewrite as fr
    from flurka_rewrite.demo import build_demo_model, demo_inputs

    out, onx = tmp_path / "saved", tmp_path / "m.onnx"
    rc, _, err = run_cli(capsys, "--demo", "-o", str(out), "--onnx", str(onx), "--kernel",
                         "rnn", "--dk", "32", "--example-shape", "2,64", "-q")
    assert rc == 0, err
    new = fr.load(str(out), base_model=build_demo_model())
    assert [s.status for s in new.flurka_report.sites] == ["rewritten", "rewritten"]
    inputs = demo_inputs(2, 64, seed=5, pad_last=9)
    with torch.no_grad():
        ref = new(**inputs)
    onnx.checker.check_model(str(onx))
    sess = ort.InferenceSession(str(onx), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    got = sess.run(None, feed)[0]
    # 1e-4: fp32 ONNX Runtime kernels sum in another order than PyTorch's.
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compiler,code,words", [
    (fake_compiler(sites=[]), 6, "no attention found"),
    (fake_compiler(exc=RuntimeError("boom\nsecond line")), 7, "RuntimeError: boom second line"),
    (fake_compiler(exc=ValueError("dk=64 needs max_seq_len")), 2, "dk=64 needs max_seq_len"),
    (fake_compiler(sites=[SiteReport(path="blocks.0.attn:softmax", pattern="p", status="skipped",
                                     reason="mask varies per query")]),
     7, "all 1 attention sites were skipped"),
], ids=["empty-report", "compiler-crash", "compiler-value-error", "all-skipped"])
def test_compiler_outcomes_map_to_exit_codes(compiler, code, words, files, tmp_path, capsys,
                                             monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flurka_rewrite.convert", compiler)
    rc, _, err = run_cli(capsys, "--demo", "-o", str(tmp_path / "o.pt2"), "-q", "--dk", "32",
                         "--example-shape", f"2,{N_EXAMPLE}")
    assert rc == code, err
    assert words in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_trust_pickle_loads_the_module(files, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flurka_rewrite.convert", fake_compiler(ONE_SITE))
    rc, out, err = run_cli(capsys, files["full.pt"], "--trust-pickle", "--dry-run", "-q")
    assert rc == 0, err
    assert "DemoTransformer: 1 attention site found" in out


def test_dry_run_writes_nothing(files, tmp_path, capsys, monkeypatch) -> None:
    if not HAS_COMPILER:
        monkeypatch.setitem(sys.modules, "flurka_rewrite.convert", fake_compiler(ONE_SITE))
    out_path = tmp_path / "o.pt2"
    rc, out, err = run_cli(capsys, "--demo", "-o", str(out_path), "--dry-run", "--kernel",
                           "relu", "--dk", "32", "--example-shape", f"2,{N_EXAMPLE}")
    assert rc == 0, err
    assert os.listdir(tmp_path) == [] and "blocks.0" in out
    assert "[1/3] loading" in err and "[2/3] planning" in err  # progress lines


def test_demo_model_ignores_padded_tokens() -> None:
    # The demo's padding mask must work, or its rel. errors would mean nothing: changing the
    # padded tokens of a sequence leaves its logits unchanged (fp32 roundoff only: 1e-5).
    model = build_demo_model()
    x = demo_inputs(2, 70, seed=3, pad_last=20)
    y = demo_inputs(2, 70, seed=3, pad_last=20)
    y["input_ids"][-1, 50:] = (y["input_ids"][-1, 50:] + 17) % 256
    with torch.no_grad():
        a, b = model(**x), model(**y)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert a.shape == (2, 4) and torch.isfinite(a).all()


def test_hf_directory_loads_offline_with_token_inputs(tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=91, hidden_size=24, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=40,
                                  max_position_embeddings=64)
    good, bad = tmp_path / "bert", tmp_path / "bert_bad"
    transformers.BertForSequenceClassification(cfg).save_pretrained(good)
    loaded = load_model(str(good), quiet=True)
    assert type(loaded.module).__name__ == "BertForSequenceClassification"
    x = example_inputs_for(loaded, (3, 37))
    assert x["input_ids"].shape == (3, 37) and int(x["input_ids"].max()) < 91
    assert x["attention_mask"].eq(1).all()
    assert set(example_inputs_for(loaded, None)) >= {"input_ids"}  # the model's dummy_inputs
    # Truncated weights: exit 3, one line.
    bad.mkdir()
    (bad / "config.json").write_text((good / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:500])
    capsys.readouterr()  # drop save_pretrained's progress bar
    rc, _, err = run_cli(capsys, str(bad), "--dry-run", "-q")
    assert rc == 3 and "could not load the Hugging Face model" in err
    assert len(err.strip().splitlines()) == 1


# -- round trips through the real compiler ------------------------------------------------
def new_inputs() -> dict[str, torch.Tensor]:
    """Inputs the conversion never saw: another seed, the last sequence padded."""
    return demo_inputs(2, N_EXAMPLE, seed=11, pad_last=30)


def run_program(path: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.export.load(path).module()(**inputs)


# The demo model as the CLI's built-in input (an nn.Module) and as a torch.export program file
# (an ATen-level GraphModule): the compiler must handle both.
SOURCES = {"builtin-demo": ["--demo"], "pt2-file": ["{demo.pt2}"]}


def source_args(source: str, demo_pt2: str) -> list[str]:
    return [demo_pt2 if a == "{demo.pt2}" else a for a in SOURCES[source]]


@needs_compiler
@pytest.mark.parametrize("source", list(SOURCES))
def test_round_trip_pt2_performer(source, demo_pt2, tmp_path, capsys) -> None:
    out, rep = str(tmp_path / "flurka.pt2"), str(tmp_path / "report.json")
    rc, stdout, err = run_cli(capsys, *source_args(source, demo_pt2), "-o", out, "--kernel",
                              "performer", "--dk", "48", "--example-shape", f"2,{N_EXAMPLE}",
                              "--report", rep)
    assert rc == 0, err
    report = RewriteReport.from_dict(json.load(open(rep)))
    assert len(report.sites) == DEMO_SITES and len(report.rewritten) == DEMO_SITES
    assert all(s.kernel == "performer" and s.dk == 48 for s in report.sites)
    y = run_program(out, new_inputs())
    assert y.shape == (2, 4) and torch.isfinite(y).all()
    assert sorted(os.listdir(tmp_path)) == ["flurka.pt2", "report.json"]  # no temp files left
    # The file holds the rewritten model: on the CLI's own example inputs it has the error the
    # CLI measured in memory (printed with 4 significant digits: rel. 2e-3), and that error is
    # not ~0 (the rewrite fired; the demo's peaked attention gives errors ~0.1-1).
    printed = float(re.search(r"example inputs = ([0-9.e+-]+)", stdout).group(1))
    loaded = (load_model(demo_pt2) if source == "pt2-file"
              else LoadedModel(build_demo_model(), "demo", "<demo>"))
    x = example_inputs_for(loaded, (2, N_EXAMPLE), seed=0)
    with torch.no_grad():
        ref = build_demo_model()(**x)
    assert rel_error(run_program(out, x), ref) == pytest.approx(printed, rel=2e-3)
    assert printed > 1e-2


@needs_compiler
@pytest.mark.parametrize("source", list(SOURCES))
def test_exact_mode_reproduces_the_original(source, demo_pt2, tmp_path, capsys) -> None:
    out = str(tmp_path / "exact.pt2")
    rc, _, err = run_cli(capsys, *source_args(source, demo_pt2), "-o", out, "--kernel", "softmax",
                         "--dk", "none", "--example-shape", f"2,{N_EXAMPLE}", "-q")
    assert rc == 0, err
    x = new_inputs()
    with torch.no_grad():
        ref = build_demo_model()(**x)
    # fp32, same math in another op order: 1e-5 (docs/design.md §6).
    torch.testing.assert_close(run_program(out, x), ref, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_pt_output_loads_with_trust_and_runs(files, tmp_path, capsys) -> None:
    out, rep = str(tmp_path / "flurka.pt"), str(tmp_path / "report.md")
    rc, _, err = run_cli(capsys, "--demo", "-o", out, "--kernel", "relu", "--dk", "32",
                         "--example-shape", f"2,{N_EXAMPLE}", "--report", rep, "-q")
    assert rc == 0, err
    model = torch.load(out, weights_only=False)
    with torch.no_grad():
        y = model(**new_inputs())
    assert torch.isfinite(y).all()
    assert open(rep).read().count("\n| `") == DEMO_SITES


@needs_compiler
def test_model_without_attention_exits_6(files, tmp_path, capsys) -> None:
    rc, _, err = run_cli(capsys, files["mlp.pt2"], "-o", str(tmp_path / "o.pt2"), "-q",
                         "--dk", "none", "--kernel", "relu")
    assert rc == 6 and "no attention found" in err
    assert os.listdir(tmp_path) == []


@needs_compiler
def test_already_converted_model_exits_6_and_says_so(files, tmp_path, capsys) -> None:
    """Converting a converted model again: nothing to rewrite, and the error says why (the
    oracle: the first conversion's output file, written by this same CLI)."""
    first = str(tmp_path / "once.pt")
    shape = ["--example-shape", f"2,{N_EXAMPLE}", "-q", "--kernel", "relu", "--dk", "32"]
    rc, _, err = run_cli(capsys, files["full.pt"], "--trust-pickle", "-o", first, *shape)
    assert rc == 0, err
    assert len(torch.load(first, weights_only=False).flurka_report.rewritten) == DEMO_SITES
    rc, _, err = run_cli(capsys, first, "--trust-pickle", "-o", str(tmp_path / "twice.pt"),
                         *shape)
    assert rc == 6 and "already converted" in err and "original model" in err
    assert sorted(os.listdir(tmp_path)) == ["once.pt"]


@needs_compiler
def test_all_sites_skipped_writes_nothing_and_names_the_fix(files, tmp_path, capsys) -> None:
    """A pickled model without --example-shape: the real compiler cannot tell the demo's mask
    kind, skips both sites, and the CLI refuses to write an unconverted copy (exit 7)."""
    rc, out, err = run_cli(capsys, files["full.pt"], "--trust-pickle", "-o",
                           str(tmp_path / "o.pt"), "-q", "--dk", "none")
    assert rc == 7 and "were skipped" in err and "--example-shape" in err
    assert out.count(" skipped ") >= DEMO_SITES  # the report with the reasons is printed
    assert os.listdir(tmp_path) == []


def test_hf_directory_with_custom_code_is_refused_without_prompting(tmp_path, capsys) -> None:
    """config.json with an auto_map to a Python file in the directory: exit 3, one line,
    nothing imported and no question asked on stdin."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=91, hidden_size=24, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=40)
    d = tmp_path / "custom"
    transformers.BertModel(cfg).save_pretrained(d)
    marker = tmp_path / "ran"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    conf = json.loads((d / "config.json").read_text())
    conf["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(conf))
    capsys.readouterr()
    rc, _, err = run_cli(capsys, str(d), "--dry-run", "-q")
    assert rc == 3 and "custom code" in err and "never runs code" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists()
