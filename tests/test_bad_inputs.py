"""Wrong steps a user takes on the command line (issue 27): each is refused at once, in one line naming
what and where, with exit code 2, in bounded memory, and every file the user had stays as it was.

Each case of the table is its own `crossvlm` process under `resource.setrlimit(RLIMIT_AS)`. A case
refused before torch is imported runs as a fresh `python -m crossvlm.cli` with 512 MB of address space.
A case refused after it is a fork of one process that imported torch and transformers once (~10 s
saved per case), allowed 1 GB of address space beyond what that process had. Before this issue, a
base LLM's folder given as `--model` built a Qwen3-0.6B-sized model and ran past 20 GB.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from crossvlm.cli import main
from crossvlm.evaluate import read_examples

# RLIMIT_AS, /proc and fork as Linux has them (CI runs Linux).
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="address-space limits and /proc are Linux's")

FAST = 512 << 20
"""Address space of a refusal that comes before torch is imported."""
TORCH = 1 << 30
"""Address space a refusal that comes after torch and transformers are imported may add to theirs."""
REPO = Path(__file__).resolve().parents[1]


# -- the user's files ---------------------------------------------------------------------------------
def _edit_config(folder: Path, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _broken_models(world: Path, vlm: Path) -> None:
    """Copies of a good model folder, each with one thing wrong."""
    bad = world / "bad"
    for name in ("cut", "empty", "random", "queries", "no_vision", "size", "no_tokenizer", "no_processor",
                 "token_id", "not_json"):
        shutil.copytree(vlm, bad / name)
    weights = (vlm / "model.safetensors").read_bytes()
    (bad / "cut" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (bad / "empty" / "model.safetensors").write_bytes(b"")
    (bad / "random" / "model.safetensors").write_bytes(os.urandom(4096))
    _edit_config(bad / "queries", lambda c: c.update(num_queries="abc"))
    _edit_config(bad / "no_vision", lambda c: c.pop("vision_config"))
    _edit_config(bad / "size", lambda c: c["text_config"].update(hidden_size=2 * c["text_config"]["hidden_size"]))
    _edit_config(bad / "token_id", lambda c: c.update(image_token_id=5))
    (bad / "no_tokenizer" / "tokenizer.json").unlink()
    (bad / "no_processor" / "preprocessor_config.json").unlink()
    (bad / "not_json" / "config.json").write_text('{"model_type": "crossvlm", ')


def _data(world: Path) -> None:
    data = world / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(data / "red.png")
    good = json.dumps({"image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]})
    broken = '{"image": "red.png", "conversations": [ {"from": '
    (data / "some_broken.jsonl").write_text("\n".join([good, good, broken, good]) + "\n")
    (data / "all_broken.jsonl").write_text("\n".join(['{"image": "red.png"}', broken]) + "\n")
    (data / "notes.txt").write_text("not a data set\n")
    (world / "nothing_here").mkdir()
    (world / "keep.jsonl").write_text('{"prediction": "an earlier run of mine"}\n')
    (world / "afile").write_text("just a file\n")


@pytest.fixture(scope="module")
def world(tiny_models, tiny_vlm_dir, tmp_path_factory) -> Path:
    """A user's working folder: base models, a saved model, broken copies of it, data, a finished run."""
    from crossvlm.train.config import load_config
    from crossvlm.train.loop import train

    world = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_models, world / "m")
    shutil.copytree(tiny_vlm_dir, world / "vlm")
    _broken_models(world, world / "vlm")
    _data(world)
    from crossvlm.data.synth import write_synthetic

    shapes = write_synthetic(world / "shapes", seed=0, n_train=16, n_test=0)
    # A real finished run (2 steps on samples longer than max_length, so each is truncated).
    cfg = load_config("debug", {"model.llm": str(world / "m" / "llm"), "model.vision": str(world / "m" / "vision"),
                                "data.sources": [str(shapes["pretrain_train"])], "data.max_length": 50,
                                "run.max_steps": 2, "run.out_dir": str(world / "run")})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(cfg)
    (world / "run.log").write_text(printed.getvalue())
    return world


def _snapshot(root: Path) -> dict:
    """Every path under `root` with its size and modification time (and a file's bytes, when small)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        small = path.is_file() and st.st_size < 1 << 16
        out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, path.read_bytes() if small else None)
    return out


def _limited(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


# One process imports what the commands import, then forks a child per case: the child limits its
# address space, moves to the case's folder, sends stdout / stderr to files and runs crossvlm's main().
WARM_DRIVER = r"""
import json, os, resource, sys, time, traceback
from crossvlm.cli import main
import crossvlm.evaluate, crossvlm.inference, crossvlm.train.loop  # torch and transformers with them
for line in sys.stdin:
    case = json.loads(line)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) << 10
            resource.setrlimit(resource.RLIMIT_AS, (size + case["limit"],) * 2)
            os.chdir(case["cwd"])
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            code = main(case["argv"])
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start}), flush=True)
"""


def _crossvlm(args: list[str], cwd: Path, limit: int, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**{k: v for k, v in os.environ.items() if k != "CROSSVLM_DEBUG"}, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", **(env or {})}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "crossvlm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, preexec_fn=_limited(limit), timeout=120)
    return done, time.perf_counter() - start


TRAIN = ["train", "debug", "--model.llm", "m/llm", "--model.vision", "m/vision",
         "--data.sources", "shapes/pretrain_train.parquet", "--run.max_steps", "2", "--data.max_length", "50"]

# (id, arguments run in the user's folder, what the one line must say, address space)
CASES = [
    # -- models: the wrong folder, a typo, a file --
    ("chat-base-llm", ["chat", "--model", "m/llm", "--prompt", "hi"],
     "--model m/llm holds a qwen3 language model, not a saved crossvlm model; use --llm/--vision", FAST),
    ("chat-vision-tower", ["chat", "--model", "m/vision", "--prompt", "hi"],
     "--model m/vision holds a clip_vision_model vision tower, not a saved crossvlm model", FAST),
    ("serve-base-llm", ["serve", "--model", "m/llm", "--port", "0"], "--model m/llm holds a qwen3 language model", FAST),
    ("eval-base-llm", ["eval", "--model", "m/llm", "--data", "data/some_broken.jsonl"],
     "--model m/llm holds a qwen3 language model", FAST),
    ("train-init-from-base-llm", [*TRAIN, "--model.init_from", "m/llm", "--run.out_dir", "new_run"],
     "model.init_from m/llm holds a qwen3 language model, not a saved crossvlm model; set model.llm", FAST),
    ("init-vlm-as-llm", ["init", "--llm", "vlm", "--vision", "m/vision", "--out", "new_vlm"],
     "--llm vlm holds a saved crossvlm model, not a base LLM; a saved crossvlm model goes to --model", FAST),
    ("chat-llm-as-vision", ["chat", "--llm", "m/llm", "--vision", "m/llm", "--prompt", "hi"],
     "--vision m/llm holds a qwen3 language model, not a vision tower", FAST),
    ("chat-typo", ["chat", "--model", "myrun", "--prompt", "hi"], "myrun: no such folder", FAST),
    ("chat-absolute-missing", ["chat", "--model", "/no/such/model", "--prompt", "hi"], "/no/such/model: no such folder", FAST),
    ("chat-missing-under-a-folder", ["chat", "--model", "m/lmm", "--prompt", "hi"],
     "m/lmm: no such folder (m exists, lmm does not)", FAST),
    ("chat-hub-id-not-found", ["chat", "--model", "crossvlm-tests/no-such-model-27", "--prompt", "hi"],
     "--model crossvlm-tests/no-such-model-27: no such folder here", FAST),
    ("init-out-not-empty", ["init", "--llm", "m/llm", "--vision", "m/vision", "--out", "data"],
     "--out data already exists and is not empty", FAST),
    ("chat-a-run-folder", ["chat", "--model", "run", "--prompt", "hi"],
     "run has no config.json: it is not a model folder (a training run? its model is run/final)", FAST),
    ("chat-a-file", ["chat", "--model", "afile", "--prompt", "hi"], "afile is a file; give the model's folder", FAST),
    ("train-llm-missing", [*TRAIN[:2], "--model.llm", "m/nollm", *TRAIN[4:], "--run.out_dir", "new_run"],
     "m/nollm: no such folder", FAST),
    # -- a saved model's files --
    ("weights-cut-short", ["chat", "--model", "bad/cut", "--prompt", "hi"], "bad/cut/model.safetensors is cut short", FAST),
    ("weights-empty", ["chat", "--model", "bad/empty", "--prompt", "hi"],
     "bad/empty/model.safetensors is empty or cut short (0 bytes)", FAST),
    ("weights-random", ["chat", "--model", "bad/random", "--prompt", "hi"],
     "bad/random/model.safetensors is not a safetensors file", FAST),
    ("config-not-json", ["chat", "--model", "bad/not_json", "--prompt", "hi"], "bad/not_json/config.json is not valid JSON", FAST),
    ("config-no-vision", ["eval", "--model", "bad/no_vision", "--data", "data/some_broken.jsonl"],
     "bad/no_vision/config.json has no vision_config", FAST),
    ("no-tokenizer", ["chat", "--model", "bad/no_tokenizer", "--prompt", "hi"], "bad/no_tokenizer has no tokenizer", FAST),
    ("no-image-processor", ["serve", "--model", "bad/no_processor"], "bad/no_processor has no preprocessor_config.json", FAST),
    ("config-field-type", ["chat", "--model", "bad/queries", "--prompt", "hi"],
     "bad/queries/config.json: invalid CrossVLM config: num_queries: expected int, got 'abc'", TORCH),
    ("config-size-not-the-weights", ["chat", "--model", "bad/size", "--prompt", "hi"],
     "weights in bad/size do not match the model: keys whose shapes differ from config.json's sizes", TORCH),
    ("image-token-not-the-tokenizers", ["chat", "--model", "bad/token_id", "--prompt", "hi"],
     "bad/token_id/config.json: image_token_id 5 is not the tokenizer's <|image_pad|>", TORCH),
    # -- configs and folders --
    ("batch-size-not-integer", [*TRAIN, "--run.batch_size", "2.5", "--run.out_dir", "new_run"],
     "run.batch_size: expected an integer, got 2.5", FAST),
    ("lr-not-a-number", [*TRAIN, "--optim.lr", "fast", "--run.out_dir", "new_run"], "optim.lr: expected a number, got 'fast'", FAST),
    ("out-dir-under-proc", [*TRAIN, "--run.out_dir", "/proc/crossvlm_run"], "run.out_dir /proc/crossvlm_run: cannot write in /proc", FAST),
    ("out-dir-under-a-file", [*TRAIN, "--run.out_dir", "afile/run"], "run.out_dir afile/run is under afile, which is a file", FAST),
    ("train-into-a-finished-run", [*TRAIN, "--run.out_dir", "run"],
     "run.out_dir run already holds a run (checkpoints, final, metrics.jsonl); continue it with --resume auto", FAST),
    ("resume-with-another-lr", [*TRAIN, "--run.out_dir", "run", "--resume", "run", "--optim.lr", "1e-5"],
     "--resume run: its checkpoint restores its optimizer, schedule and random state, which would override what "
     "this run changes (optim.lr 0.002 -> 1e-05)", FAST),
    ("resume-auto-with-another-seed", [*TRAIN, "--run.out_dir", "run", "--resume", "auto", "--run.seed", "7"],
     "(run.seed 0 -> 7)", FAST),
    ("resume-not-a-checkpoint", [*TRAIN, "--run.out_dir", "new_run", "--resume", "data"],
     "--resume data: it is neither a checkpoint (no meta.json) nor a run's out_dir (no checkpoints/)", FAST),
    ("resume-and-overwrite", [*TRAIN, "--run.out_dir", "run", "--resume", "auto", "--overwrite"],
     "--resume and --overwrite (run.overwrite) contradict each other", FAST),
    ("init-out-under-a-file", ["init", "--llm", "m/llm", "--vision", "m/vision", "--out", "afile/vlm"],
     "--out afile/vlm is under afile, which is a file", FAST),
    ("eval-out-is-a-folder", ["eval", "--model", "vlm", "--data", "data/some_broken.jsonl", "--out", "data"],
     "--out data is a folder; name the predictions file", FAST),
    # -- data --
    ("inspect-llm-without-tokenizer", ["data", "inspect", "data/some_broken.jsonl", "--llm", "m/vision"],
     "--llm m/vision: m/vision has no tokenizer", FAST),
    ("train-data-folder-without-data", [*TRAIN[:6], "--data.sources", "nothing_here", *TRAIN[8:], "--run.out_dir",
                                        "new_run"], "data.sources[0]: nothing_here: folder holds no .parquet, .json, .jsonl or .tar file", TORCH),
    ("synth-out-under-a-file", ["data", "synth", "--out", "afile/shapes"], "--out afile/shapes is under afile", FAST),
    ("eval-data-missing", ["eval", "--model", "vlm", "--data", "data/nothing.jsonl", "--out", "keep.jsonl"],
     "data/nothing.jsonl: no such file or folder", TORCH),
    ("eval-data-unknown-format", ["eval", "--model", "vlm", "--data", "data/notes.txt", "--out", "keep.jsonl"],
     "data/notes.txt: cannot tell the format from the suffix '.txt'", TORCH),
    ("out-dir-read-only", [*TRAIN, "--run.out_dir", "/sys/crossvlm_run"], "run.out_dir /sys/crossvlm_run: cannot write in /sys", FAST),
    ("eval-every-line-broken-keeps-out", ["eval", "--model", "vlm", "--data", "data/all_broken.jsonl", "--out",
                                          "keep.jsonl", "--device", "cpu"],
     "no example could be evaluated (skipped: {'malformed': 2})", TORCH),
]


@pytest.fixture(scope="module")
def warm_runs(world, tmp_path_factory) -> dict:
    """The cases refused after torch loads, each a child of one warm process (WARM_DRIVER); with the
    folder's snapshots before and after them all."""
    logs = tmp_path_factory.mktemp("warm_runs")
    cases = [c for c in CASES if c[3] == TORCH]
    lines = "".join(json.dumps({"argv": c[1], "cwd": str(world), "limit": TORCH, "out": str(logs / f"{c[0]}.out"),
                                "err": str(logs / f"{c[0]}.err")}) + "\n" for c in cases)
    env = {**{k: v for k, v in os.environ.items() if k != "CROSSVLM_DEBUG"}, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # (main() sets it before HF imports)
    before = _snapshot(world)
    done = subprocess.run([sys.executable, "-c", WARM_DRIVER], input=lines, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    results = {}
    for case, line in zip(cases, done.stdout.splitlines(), strict=True):
        result = json.loads(line)
        out, err = (logs / f"{case[0]}.out").read_text(), (logs / f"{case[0]}.err").read_text()
        results[case[0]] = (subprocess.CompletedProcess(case[1], result["rc"], out, err), result["seconds"])
    return {"results": results, "before": before, "after": _snapshot(world)}


@pytest.mark.parametrize("case, args, says, limit", CASES, ids=[c[0] for c in CASES])
def test_a_wrong_step_is_refused_in_one_line_and_changes_nothing(world, warm_runs, case, args, says, limit):
    if limit == TORCH:
        (done, seconds), before, after = warm_runs["results"][case], warm_runs["before"], warm_runs["after"]
    else:
        before = _snapshot(world)
        done, seconds = _crossvlm(args, world, limit)
        after = _snapshot(world)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"crossvlm {args[0]}: error: ") and says in lines[0], lines[0]
    assert done.stdout == ""
    assert after == before  # nothing written, nothing truncated, no run overwritten
    assert seconds < (10 if limit == FAST else 30)  # no hub retries, no model built first


def test_debug_shows_the_traceback(world):
    for extra, env in ((["--debug"], None), ([], {"CROSSVLM_DEBUG": "1"})):
        done, _ = _crossvlm(["chat", "--model", "m/llm", "--prompt", "hi", *extra], world, FAST, env)
        assert done.returncode != 0 and "Traceback" in done.stderr and "ModelLoadError" in done.stderr


# -- what the wrong steps did before: output kept, lines counted, runs told apart --------------------
def test_eval_skips_broken_lines_naming_file_and_record(world, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    assert main(["eval", "--model", str(world / "vlm"), "--data", str(world / "data" / "some_broken.jsonl"),
                 "--out", str(out), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 3 and metrics["skipped"] == {"malformed": 1}
    assert metrics["skipped_examples"] == [f"malformed: {world / 'data' / 'some_broken.jsonl'} record 2"]
    assert len(out.read_text().splitlines()) == 3
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".predictions")]  # no temporary file left


def test_eval_limit_reads_only_the_rows_it_needs(world, tmp_path, monkeypatch):
    """`--limit 5` on a large file parses 5 records, not the file (the rest are broken: never read)."""
    from crossvlm.data.readers import JsonReader

    lines = (world / "data" / "some_broken.jsonl").read_text().splitlines()
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join([lines[0]] * 5 + [lines[2]] * 20000) + "\n")
    parsed = []
    original = JsonReader.record
    monkeypatch.setattr(JsonReader, "record", lambda self, row: parsed.append(row) or original(self, row))
    examples = list(read_examples(big, image_root=world / "data", limit=5))
    assert len(examples) == 5 and examples[0].references == ["red"]
    assert len(parsed) <= 10  # each of the 5 rows: its conversation and its answer fields


def test_interactive_chat_on_piped_input_stops_the_engine(world, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nand again\n"))
    assert main(["chat", "--model", str(world / "vlm"), "--max-new-tokens", "2", "--greedy", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # two answers
    assert not [t for t in threading.enumerate() if t.name == "crossvlm-engine"]  # joined before the return


def test_truncated_samples_are_counted_in_the_first_lines_and_metrics(world):
    from crossvlm.train.loggers import read_metrics

    log = (world / "run.log").read_text().splitlines()
    note = next(i for i, line in enumerate(log) if "longer than data.max_length=50" in line)
    assert note <= 3, log  # among the run's first lines
    assert "4 of the 4 samples read so far (100.0%)" in log[note]
    logged = [m for m in read_metrics(world / "run" / "metrics.jsonl") if "loss" in m]
    assert [m["truncated"] for m in logged] == [4, 8] and logged[-1]["truncated_share"] == 1.0


def test_resume_from_a_run_folder_takes_its_latest_checkpoint(world):
    from crossvlm.train.checkpoint import find_resume

    assert find_resume(world / "elsewhere", str(world / "run")) == world / "run" / "checkpoints" / "step-0000002"


def test_overwrite_starts_a_finished_run_over_with_nothing_of_it_left(world, tmp_path):
    """`--overwrite`: the old run's checkpoints, final/ and metrics go first, so `--resume auto` later
    can only find the new run's."""
    from crossvlm.train.config import load_config
    from crossvlm.train.loggers import read_metrics
    from crossvlm.train.loop import train

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    (run / "notes.md").write_text("mine")  # not the run's: kept
    cfg = load_config("debug", {"model.llm": str(world / "m" / "llm"), "model.vision": str(world / "m" / "vision"),
                                "data.sources": [str(world / "shapes" / "pretrain_train.parquet")],
                                "data.max_length": 50, "run.max_steps": 1, "run.out_dir": str(run),
                                "run.overwrite": True})
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        train(cfg)
    assert "removed the earlier run's checkpoints, final, metrics.jsonl" in printed.getvalue()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000001"]
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m] == [1]
    assert (run / "notes.md").read_text() == "mine"
