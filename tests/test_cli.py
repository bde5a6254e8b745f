"""The console script: every subcommand parses and prints its help; stages by name; `crossvlm init`; quiet output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from crossvlm.cli import build_parser


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help_runs_as_console_script():
    out = subprocess.run([sys.executable, "-m", "crossvlm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in _subcommands():
        assert name in out.stdout


@pytest.mark.parametrize("name", _subcommands())
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([name, "--help"])
    assert exit_.value.code == 0
    assert "usage: crossvlm " + name in capsys.readouterr().out


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    from crossvlm.cli import main

    code = main(["chat", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("crossvlm chat: error:") and "nope" in err


# -- shipped configs by name ---------------------------------------------------------------------------
def test_train_list_names_every_shipped_config_with_its_purpose(capsys):
    from crossvlm.cli import main
    from crossvlm.configs import shipped_configs

    assert main(["train", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [p.stem for p in shipped_configs()]
    for line in lines:
        assert len(line.split(None, 1)[1]) > 20  # a stated purpose, not an empty column


def test_stage_names_resolve_anywhere_and_a_file_wins(tmp_path, monkeypatch, capsys):
    from crossvlm.cli import main

    monkeypatch.chdir(tmp_path)  # no checkout here: the names come from the package
    (tmp_path / "d.parquet").write_bytes(b"")
    for name in ("pretrain", "sft", "debug", "demo_pretrain", "demo_sft", "sft.yaml"):
        assert main(["train", name, "--data_path", "d.parquet", "--eval_data.sources", "d.parquet",
                     "--print-config"]) == 0, name
    assert "out_dir: runs/sft" in capsys.readouterr().out.split("run:")[-1]
    (tmp_path / "sft.yaml").write_text("run: {batch_size: 3}\n")  # a file of that name exists: it is used
    assert main(["train", "sft.yaml", "--data_path", "d.parquet", "--print-config"]) == 0
    assert "batch_size: 3" in capsys.readouterr().out
    assert main(["train", "configs/pretrain.yaml", "--data_path", "d.parquet"]) == 2
    err = capsys.readouterr().err
    assert "configs/pretrain.yaml does not exist" in err and "debug, demo_pretrain, demo_sft, pretrain, sft" in err


# -- crossvlm init -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_init_writes_a_model_directory_chat_eval_and_train_take(tiny_models, tmp_path, capsys):
    from crossvlm.cli import main
    from crossvlm.data.synth import write_synthetic
    from crossvlm.inference import ChatModel

    out = tmp_path / "vlm"
    assert main(["init", "--llm", str(tiny_models / "llm"), "--vision", str(tiny_models / "vision"), "--out", str(out),
                 "--model.num_queries", "16", "--model.projector_heads", "4"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} (from {tiny_models / 'llm'} and {tiny_models / 'vision'}, " \
                                              "projector untrained)"
    chat = ChatModel.load(out, device="cpu")  # what chat and serve load
    assert chat.model.num_image_tokens == 16
    data = write_synthetic(tmp_path / "shapes", n_train=4, n_test=2)
    assert main(["eval", "--model", str(out), "--data", str(data["sft_test"]), "--limit", "2",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "pred.jsonl")]) == 0
    assert main(["train", "debug", "--model.init_from", str(out), "--data.sources", str(data["sft_train"]),
                 "--run.max_steps", "1", "--run.out_dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_init_never_leaves_a_half_written_directory(tiny_models, tmp_path, capsys):
    from crossvlm.cli import main

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["init", "--llm", str(tiny_models / "llm"), "--vision", str(tiny_models / "vision"),
                 "--out", str(taken)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err and os.listdir(taken) == ["keep.txt"]
    assert main(["init", "--llm", str(tiny_models / "llm"), "--vision", str(tmp_path / "no_vision"),
                 "--out", str(tmp_path / "new")]) != 0
    assert os.listdir(tmp_path) == ["taken"]  # neither the folder nor its staging copy
    assert main(["init", "--out", str(tmp_path / "x"), "--run.epochs", "2"]) == 2
    assert "only --model.* options" in capsys.readouterr().err


# -- quiet output ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_commands_say_what_they_wrote_and_nothing_else(tmp_path):
    """No transformers fallback warning (there is no torchvision here), no progress bars: make-model and
    init each print the one line of what they wrote, and a chat with the saved model prints only the answer.
    One fresh process runs the three (transformers warns once per process)."""
    m, vlm = tmp_path / "m", tmp_path / "vlm"
    commands = [["make-model", "--out", str(m)],
                ["init", "--llm", str(m / "llm"), "--vision", str(m / "vision"), "--out", str(vlm)],
                ["chat", "--model", str(vlm), "--prompt", "hi", "--max-new-tokens", "2", "--greedy"]]
    script = "import sys\nfrom crossvlm.cli import main\nfor argv in %r:\n    assert main(argv) == 0\n    print('<end>', flush=True)" % commands
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (0, "")
    made, initialised, answer, _ = done.stdout.split("<end>\n")
    assert made == f"wrote {m}/llm and {m}/vision\n"
    assert initialised == f"wrote {vlm} (from {m}/llm and {m}/vision, projector untrained)\n"
    assert answer.strip()  # the answer alone (gibberish from random weights)
