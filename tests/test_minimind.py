"""MiniMind-V's trainer flags: every one mapped or explained, the README's table in step with the code,
and the tutorial's two commands run as written (tiny models, CPU)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from crossvlm.errors import ConfigError
from crossvlm.train.config import load_config, parse_overrides
from crossvlm.train.minimind import FLAGS

README = Path(__file__).parents[1] / "README.md"

# The flags of MiniMind-V's trainer/train_pretrain_vlm.py and trainer/train_sft_vlm.py (read from the
# scripts: `python trainer/train_pretrain_vlm.py --help`), older releases' `--out_dir`, `--ddp`,
# `--local_rank`, `--warmup_iters` included.
MINIMIND_V_FLAGS = {
    "save_dir", "save_weight", "epochs", "batch_size", "learning_rate", "device", "dtype", "num_workers",
    "accumulation_steps", "grad_clip", "log_interval", "save_interval", "hidden_size", "num_hidden_layers",
    "max_seq_len", "use_moe", "data_path", "images_path", "from_weight", "from_resume", "freeze_llm", "use_wandb",
    "wandb_project", "use_compile", "out_dir", "ddp", "local_rank", "warmup_iters",
}

# The tutorial's two commands (issue 19), after `crossvlm train pretrain` / `crossvlm train sft`.
PRETRAIN = ("--epochs 4 --batch_size 2 --learning_rate 2e-4 --data_path ../dataset/pretrain_i2t.parquet "
            "--save_weight pretrain_qwen3_vlm --log_interval 100 --save_interval 1000 --from_weight none "
            "--freeze_llm 1 --use_wandb").split()
SFT = ("--epochs 2 --batch_size 1 --learning_rate 1e-5 --data_path ../dataset/sft_i2t.parquet "
       "--save_weight sft_qwen3_vlm --from_weight pretrain_qwen3_vlm --log_interval 50 --save_interval 500 "
       "--use_wandb").split()


def readme_table() -> dict[str, tuple[str | None, str]]:
    """The README's MiniMind-V table: flag → (crossvlm key or None, what it says)."""
    text = README.read_text().split("### Coming from MiniMind-V", 1)[1]
    rows = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\| `--(\w+)` \| (?:`([\w.]+)`|—) \| (.+) \|", line.strip())
        if m:
            rows[m[1]] = (m[2], m[3])
    return rows


def test_every_minimind_flag_is_mapped_or_explained():
    assert set(FLAGS) == MINIMIND_V_FLAGS
    for name, flag in FLAGS.items():
        assert flag.note, name
        assert (flag.key is None) == (flag.convert is None), name  # no key: explained and ignored


def test_readme_table_matches_the_code():
    assert readme_table() == {name: (flag.key, flag.note) for name, flag in FLAGS.items()}


def _value(cfg, key: str):
    if key == "data.sources":
        return [(s.path, s.image_root) for s in cfg.data.sources]
    section, field = key.split(".")
    return getattr(getattr(cfg, section), field)


# flag → (its arguments, the value the table's key then holds); run folders are relative to the cwd.
EXAMPLES = {
    "epochs": (["3"], 3.0), "batch_size": (["8"], 8), "learning_rate": (["5e-4"], 5e-4),
    "data_path": (["d.parquet"], [("d.parquet", None)]),
    "images_path": (["imgs", "--data_path", "d.parquet"], [("d.parquet", "imgs")]),
    "save_dir": (["out"], "out/sft"), "out_dir": (["out"], "out/sft"), "save_weight": (["mine"], "runs/mine"),
    "from_weight": (["earlier"], "runs/earlier/final"), "from_resume": (["1"], "auto"), "freeze_llm": (["1"], "frozen"),
    "max_seq_len": (["512"], 512), "device": (["cuda:1"], "cuda:1"), "dtype": (["bf16"], "bfloat16"),
    "num_workers": (["3"], 3), "accumulation_steps": (["4"], 4), "grad_clip": (["0.5"], 0.5),
    "warmup_iters": (["10"], 10), "log_interval": (["7"], 7), "save_interval": (["70"], 70), "use_wandb": ([], True),
    "wandb_project": (["p"], "p"), "use_compile": (["1"], True),
    "hidden_size": (["768"], None), "num_hidden_layers": (["16"], None), "use_moe": (["1"], None), "ddp": ([], None),
    "local_rank": (["0"], None),
}


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_each_table_flag_parses_to_the_key_it_claims(flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("d.parquet").write_bytes(b"")
    Path("runs/earlier/final").mkdir(parents=True)
    Path("imgs").mkdir()
    Path("runs/earlier/final/config.json").write_text("{}")
    key, _ = readme_table()[flag]
    extra, expected = EXAMPLES[flag]
    args = [f"--{flag}", *extra] + ([] if flag in ("data_path", "images_path") else ["--data_path", "d.parquet"])
    notes: list[str] = []
    cfg = load_config("sft", parse_overrides(args, notes))
    if key is None:  # explained, and nothing changes
        assert notes == [f"--{flag} {FLAGS[flag].note}"]
        assert cfg.to_dict() == load_config("sft", parse_overrides(["--data_path", "d.parquet"])).to_dict()
    else:
        assert notes == [] and _value(cfg, key) == expected


def test_bad_values_and_missing_runs_say_what_and_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        parse_overrides(["--freeze_llm", "2", "--epochs", "many", "--images_path", "imgs"])
    msg = str(err.value)
    assert "--freeze_llm 2: takes 1" in msg and "--epochs many: expected a number" in msg
    assert "--images_path needs --data_path" in msg
    Path("d.parquet").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        load_config("sft", parse_overrides(["--from_weight", "pretrain_x", "--save_dir", "out", "--data_path", "d.parquet"]))
    assert "no run named 'pretrain_x' (looked for out/pretrain_x/final/config.json" in str(err.value)
    model = tmp_path / "some_model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = load_config("sft", parse_overrides(["--from_weight", str(model), "--data_path", "d.parquet"]))
    assert cfg.model.init_from == str(model)  # not a run's name: a model directory
    for base in ("none", "llm"):
        assert load_config("sft", parse_overrides(["--from_weight", base, "--data_path", "d.parquet"])).model.init_from is None


@pytest.fixture()
def tutorial_dir(tmp_path, monkeypatch):
    """A working folder beside ../dataset/{pretrain,sft}_i2t.parquet, as the tutorial lays them out."""
    from crossvlm.data.synth import write_synthetic

    data = write_synthetic(tmp_path / "shapes", seed=0, n_train=6, n_test=1)
    (tmp_path / "dataset").mkdir()
    shutil.copy(data["pretrain_train"], tmp_path / "dataset" / "pretrain_i2t.parquet")
    shutil.copy(data["sft_train"], tmp_path / "dataset" / "sft_i2t.parquet")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


@pytest.mark.slow
def test_the_tutorials_two_commands_run(tutorial_dir, tiny_models, monkeypatch, capsys):
    import crossvlm.train.loop
    from crossvlm.cli import main
    from crossvlm.train.loggers import read_metrics

    models = ["--model.llm", str(tiny_models / "llm"), "--model.vision", str(tiny_models / "vision")]
    quick = ["--data.num_workers", "0", "--run.progress", "false", "--run.plot", "false"]

    # wandb is not installed: the command stops at once, before any model is loaded.
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "wandb", None)
        patch.setattr(crossvlm.train.loop, "train", lambda cfg: pytest.fail("training started without wandb"))
        assert main(["train", "pretrain", *PRETRAIN, *models, *quick]) == 2
    assert "pip install wandb" in capsys.readouterr().err

    # Without --use_wandb both run; the second starts from the first's model, found by its name.
    assert main(["train", "pretrain", *PRETRAIN[:-1], *models, *quick]) == 0
    pretrained = tutorial_dir / "runs" / "pretrain_qwen3_vlm" / "final"
    assert (pretrained / "model.safetensors").is_file()
    assert main(["train", "sft", *SFT[:-1], *quick, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "init_from: runs/pretrain_qwen3_vlm/final" in printed and "out_dir: runs/sft_qwen3_vlm" in printed
    assert main(["train", "sft", *SFT[:-1], *quick]) == 0
    assert (tutorial_dir / "runs" / "sft_qwen3_vlm" / "final" / "model.safetensors").is_file()
    # The flags took: 6 rows are 4 epochs of 3 batches of 2, then 2 epochs of 6 batches of 1.
    for run, steps in (("pretrain_qwen3_vlm", 12), ("sft_qwen3_vlm", 12)):
        assert max(m["step"] for m in read_metrics(tutorial_dir / "runs" / run / "metrics.jsonl")) == steps
