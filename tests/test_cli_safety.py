"""Careless paths and unlucky runs: the CLI never deletes or overwrites what is not its own,
publishes outputs atomically and exclusively, cleans up after SIGTERM, keeps file modes,
maps write failures to exit 10 before or without leaving partial files, and prints what a
file says only escaped. Oracle: the files on disk before and after."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flurka_rewrite.passes import atomic
from flurka_rewrite.cli import main

DEMO = ["--demo", "--dk", "8", "--example-shape", "2,16", "-q"]


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_force_never_replaces_a_directory_that_is_not_a_save(tmp_path, capsys) -> None:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "recipe.json").write_text('{"my": "recipe"}')
    (d / "thesis.tex").write_text("years of work")
    before = snapshot(d)
    rc, err = run(capsys, *DEMO, "-o", str(d), "--force")
    assert rc == 8 and "not a directory written by" in err and "thesis.tex" in err, err
    assert snapshot(d) == before


def test_force_replaces_its_own_save(tmp_path, capsys) -> None:
    out = tmp_path / "save"
    assert run(capsys, *DEMO, "-o", str(out))[0] == 0
    first = snapshot(out)
    rc, err = run(capsys, *DEMO, "-o", str(out), "--force", "--seed", "3")
    assert rc == 0, err
    assert set(snapshot(out)) == set(first) and snapshot(out) != first
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".flurka-")]


@pytest.mark.parametrize("where", ["output_holds_input", "report_in_input_dir",
                                   "onnx_in_input_dir", "output_in_input_dir",
                                   "output_is_input_by_link"])
def test_no_output_is_an_input_holds_one_or_lies_inside_one(where, tmp_path, capsys) -> None:
    """Checked before loading: the input here is not even a model."""
    src = tmp_path / "model_dir"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (tmp_path / "link.pt2").symlink_to(tmp_path / "model.pt2")
    (tmp_path / "model.pt2").write_bytes(b"not read")
    cases = {
        "output_holds_input": (str(src / "config.json"), ["-o", str(src), "--force"]),
        "report_in_input_dir": (str(src), ["-o", str(tmp_path / "o.pt2"), "--report",
                                           str(src / "config.json"), "--force"]),
        "onnx_in_input_dir": (str(src), ["-o", str(tmp_path / "o.pt2"), "--onnx",
                                         str(src / "m.onnx")]),
        "output_in_input_dir": (str(src), ["-o", str(src / "sub" / "o.pt2")]),
        "output_is_input_by_link": (str(tmp_path / "link.pt2"),
                                    ["-o", str(tmp_path / "model.pt2"), "--force"]),
    }
    source, argv = cases[where]
    before = snapshot(tmp_path)
    rc, err = run(capsys, source, *argv)
    assert rc == 8, err
    assert snapshot(tmp_path) == before


def test_two_outputs_on_one_path_are_refused(tmp_path, capsys) -> None:
    rc, err = run(capsys, *DEMO, "-o", str(tmp_path / "a.pt2"), "--onnx", str(tmp_path / "a.pt2"))
    assert rc == 2 and "same path" in err, err


def test_a_run_that_loses_the_race_exits_8_and_keeps_the_winner(tmp_path, capsys,
                                                                 monkeypatch) -> None:
    """Both runs saw no output; the other one published first, while this one converted."""
    import flurka_rewrite.cli as cli

    out = tmp_path / "o.pt2"
    real = cli.end_to_end_error

    def other_run_finishes(*a, **k):
        out.write_bytes(b"the other run's model")
        return real(*a, **k)
    monkeypatch.setattr(cli, "end_to_end_error", other_run_finishes)
    rc, err = run(capsys, *DEMO, "-o", str(out))
    assert rc == 8 and "appeared while converting" in err, err
    assert out.read_bytes() == b"the other run's model"


def test_exclusive_publish_of_a_directory(tmp_path) -> None:
    d = tmp_path / "d"
    with pytest.raises(FileExistsError):
        with atomic.atomic_dir(str(d)) as tmp:
            open(os.path.join(tmp, "a"), "w").close()
            d.mkdir()
            (d / "theirs").write_text("x")
    assert os.listdir(d) == ["theirs"]
    assert [n for n in os.listdir(tmp_path)] == ["d"]


def test_replacing_a_directory_swaps_it_in_one_step(tmp_path, monkeypatch) -> None:
    """A crash right after the swap (the old directory not yet removed) leaves the path with
    the complete new directory: it is never missing."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "old").write_text("old")
    seen = []
    real_rmtree = atomic.shutil.rmtree

    def crash(path, *a, **k):
        seen.append(sorted(os.listdir(d)))
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(str(d), replace=True) as tmp:
            open(os.path.join(tmp, "new"), "w").close()
    assert seen == [["new"]] and os.listdir(d) == ["new"]
    monkeypatch.setattr(atomic.shutil, "rmtree", real_rmtree)


def test_sigterm_mid_write_cleans_up_and_exits_143(tmp_path, capsys, monkeypatch) -> None:
    import flurka_rewrite.outputs as outputs

    def killed(path, data):
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    monkeypatch.setattr(outputs, "write_bytes", killed)
    rc, err = run(capsys, *DEMO, "-o", str(tmp_path / "o.pt2"))
    assert rc == 143 and "terminated" in err, err
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_of_dead_runs_are_swept(tmp_path, capsys) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f".flurka-{dead}-abc.pt2").write_bytes(b"half")
    (tmp_path / f".flurka-{dead}-dir").mkdir()
    live = tmp_path / f".flurka-{os.getppid()}-keep"
    live.write_bytes(b"another run, still writing")
    assert run(capsys, *DEMO, "-o", str(tmp_path / "o.pt2"))[0] == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["o.pt2", live.name])


def test_force_keeps_the_mode_of_the_file_it_replaces(tmp_path, capsys) -> None:
    out = tmp_path / "o.pt2"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    assert run(capsys, *DEMO, "-o", str(out), "--force")[0] == 0
    assert out.stat().st_mode & 0o777 == 0o600 and out.read_bytes() != b"old"


def test_full_disk_exits_10_and_leaves_the_old_file(tmp_path, capsys, monkeypatch) -> None:
    import flurka_rewrite.outputs as outputs

    def full(path, data):
        open(path, "wb").write(data[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(outputs, "write_bytes", full)
    out = tmp_path / "o.pt2"
    out.write_bytes(b"old")
    rc, err = run(capsys, *DEMO, "-o", str(out), "--force")
    assert rc == 10 and "No space left" in err, err
    assert os.listdir(tmp_path) == ["o.pt2"] and out.read_bytes() == b"old"


def test_unwritable_target_exits_10_before_converting(tmp_path, capsys) -> None:
    if os.access("/sys", os.W_OK):
        try:
            open("/sys/.flurka-probe", "w").close()
            pytest.skip("/sys is writable here")
        except OSError:
            pass
    rc = main(["--demo", "--dk", "8", "-o", "/sys/out.pt2"])
    err = capsys.readouterr().err
    assert rc == 10 and "not writable" in err, err
    assert "converting" not in err


@pytest.mark.parametrize("existing", ["dir_for_file", "file_for_dir"])
def test_unsuitable_existing_output_exits_8_before_converting(existing, tmp_path, capsys) -> None:
    target = tmp_path / ("o.pt2" if existing == "dir_for_file" else "save_dir")
    target.mkdir() if existing == "dir_for_file" else target.write_bytes(b"x")
    if existing == "dir_for_file":
        (target / "f").write_text("keep")
    rc = main(["--demo", "--dk", "8", "-o", str(target) + ("" if existing == "dir_for_file"
                                                            else os.sep), "--force"])
    err = capsys.readouterr().err
    assert rc == 8 and "converting" not in err, err


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_start_up_is_one_line(sig, code) -> None:
    """The console script's entry installs its handling before importing torch."""
    child = (  # says "ready" once the CLI's import has begun, then waits for the signal
        "import builtins, signal, sys, time, flurka_rewrite_entry as e\n"
        # a job started with & by a non-interactive shell inherits SIGINT ignored, and so would
        # this child: give it the default disposition a terminal's Ctrl-C meets
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "real = builtins.__import__\n"
        "def hook(name, *a, **k):\n"
        "    if name == 'flurka_rewrite.cli':\n"
        "        print('ready', flush=True); time.sleep(30)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = hook\n"
        "sys.exit(e.main())\n")
    p = subprocess.Popen([sys.executable, "-c", child, "--demo", "--dry-run"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_config_text_is_printed_escaped(tmp_path, capsys) -> None:
    """Escape sequences in a model directory's config.json never reach the terminal raw."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "\x1b]0;owned\x07\x1b[2Jbert"}))
    rc, err = run(capsys, str(d), "--dry-run")
    assert rc == 3, err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err, err


def test_example_longer_than_the_model_allows_is_named(tmp_path, capsys) -> None:
    """Not a raw broadcast error from the position embedding: the CLI (exit 2) and the API
    (ValueError) name the config's limit."""
    transformers = pytest.importorskip("transformers")
    import torch

    import flurka_rewrite as fr

    cfg = transformers.BertConfig(vocab_size=91, hidden_size=24, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=40,
                                  max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path / "bert")
    rc, err = run(capsys, str(tmp_path / "bert"), "--dry-run", "--example-shape", "2,40",
                  "--dk", "8")
    assert rc == 2 and "at most 32 positions (max_position_embeddings" in err, err
    with pytest.raises(ValueError, match="at most 32 positions"):
        fr.convert(model, example_inputs={"input_ids": torch.zeros(2, 40, dtype=torch.long)},
                   dk=8)


def test_save_of_a_plain_module_tells_the_cli_user_what_to_do(tmp_path, capsys) -> None:
    assert run(capsys, *DEMO, "-o", str(tmp_path / "save"))[0] == 0
    rc, err = run(capsys, str(tmp_path / "save"), "--dry-run")
    assert rc == 3 and "flurka_rewrite.load(path, base_model=" in err, err
    assert "cannot rebuild" in err


def test_readme_exit_code_table_is_complete() -> None:
    """The exit-code table of docs/cli.md (linked from the README) lists exactly the codes the
    CLI returns (EXIT_CODES), and every error class's code is in it."""
    import re

    from flurka_rewrite import io as fio
    from flurka_rewrite.cli import EXIT_CODES

    readme = open(os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md")).read()
    table = readme[readme.index("| code | meaning |"):]
    table = table[:table.index("\n\n")]
    codes = [int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)]
    assert codes == sorted(EXIT_CODES)
    errors = {c.exit_code for c in vars(fio).values()
              if isinstance(c, type) and issubclass(c, fio.CliError)}
    assert errors <= set(EXIT_CODES)
