"""Every ``fastdpo`` subcommand answers absurd arguments and bad input files with exit code 2 and ONE line on stderr
naming the argument (or the file and row), never a traceback (issue 13, item 10): negative, zero, NaN, infinite,
huge and mistyped values, missing files, folders given for files, files given for folders, malformed rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastdpo.cli import main as cli_main


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``fastdpo *argv`` in-process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse, fastdpo bench / memory end usage errors with SystemExit(2)
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def assert_usage_error(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    code, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, code, err[-2000:])
    assert len(lines) == 1, (argv, lines)
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (argv, needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------------- fastdpo train
def bad_values(table: dict[str, list[str]]) -> list[tuple[list[str], str]]:
    """``{flag: [refused values]}`` -> ``[([flag, value], flag), ...]``: cases whose one-line error names the flag."""
    return [([flag, value], flag) for flag, values in table.items() for value in values]


TRAIN_BAD = [
    *bad_values(
        {
            "--max-length": ["0", "-3"],
            "--device": ["bogus", "cuda:7", "meta"],
            "--threads": ["0", "100000"],
            "--lr": ["nan", "inf", "-1e-3", "0", "fast"],
            "--steps": ["0", "-5", "1e3"],
            "--batch-size": ["0"],
            "--eval-batch-size": ["-1"],
            "--eval-batches": ["0"],
            "--beta": ["0", "nan", "-inf"],
            "--label-smoothing": ["1", "-0.1"],
            "--loss-weights": ["nan"],
            "--weight-decay": ["-1"],
            "--warmup-steps": ["-1"],
            "--max-grad-norm": ["inf", "-1"],
            "--seed": ["-1", str(2**70)],
            "--eval-fraction": ["0", "1", "nan"],
            "--hidden-size": ["0", "40"],
            "--layers": ["0"],
            "--vocab-size": ["10"],
            "--save-every": ["-1"],
            "--log-every": ["-2"],
            "--eval-every": ["-1"],
            "--stop-after": ["0"],
            "--arch": ["gpt"],
            "--dtype": ["int8"],
            "--packing": ["zip"],
            "--lr-schedule": ["step"],
            "--on-nonfinite": ["ignore"],
        }
    ),
    (["--resume"], "does not exist"),
    (["--resume", "--overwrite"], "--overwrite"),
    (["--no-such-flag"], "--no-such-flag"),
]


@pytest.mark.parametrize(("args", "needle"), TRAIN_BAD, ids=[" ".join(a) for a, _ in TRAIN_BAD])
def test_train_bad_arguments(args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert_usage_error(["train", "--output-dir", str(tmp_path / "out"), "--no-progress", *args], capsys, needle)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_train_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_usage_error(["train", "--output-dir", str(a_file)], capsys, "--output-dir", "not a folder")
    assert_usage_error(["train", "--output-dir", str(a_file / "sub")], capsys, "--output-dir")
    out = ["--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert_usage_error(["train", *out, "--model", str(tmp_path / "no-such-model")], capsys, "--model", "no config.json")
    assert_usage_error(["train", *out, "--model", "meta-llama/Llama-3-8B"], capsys, "--model", "downloads nothing")
    assert_usage_error(["train", *out, "--model", str(tmp_path)], capsys, "--model")
    assert_usage_error(["train", *out, "--data", str(tmp_path / "missing.jsonl")], capsys, "--data", "not found")
    assert_usage_error(["train", *out, "--data", str(tmp_path)], capsys, "--data", "folder")
    assert_usage_error(["train", *out, "--eval-data", str(tmp_path / "missing.jsonl")], capsys, "--eval-data")
    # a tiny model too large for this machine's memory: refused before allocating it
    assert_usage_error(["train", *out, "--hidden-size", "1048576", "--layers", "1000"], capsys, "--hidden-size", "GiB")


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "copy 1 2 =", "chosen": " 1 2", "rejected": " 1 3"})


def test_train_malformed_files_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = ["--output-dir", str(tmp_path / "out"), "--no-progress"]
    cases = {
        "broken.jsonl": ([GOOD, GOOD, '{"prompt": "x", "chosen": '], "line 3", "not valid JSON"),
        "null_prompt.jsonl": (
            [GOOD, json.dumps({"prompt": None, "chosen": "a", "rejected": "b"})],
            "line 2",
            "'prompt'",
        ),
        "number.jsonl": (
            [GOOD, GOOD, GOOD, json.dumps({"prompt": 5, "chosen": "a", "rejected": "b"})],
            "line 4",
            "got a number",
        ),
        "not_object.jsonl": ([GOOD, "[1, 2, 3]"], "line 2", "expected an object"),
        "missing_key.jsonl": ([GOOD, json.dumps({"prompt": "p", "chosen": "a"})], "line 2", "rejected"),
        "bad_message.jsonl": (
            [
                GOOD,
                json.dumps(
                    {
                        "prompt": [{"role": "user"}],
                        "chosen": [{"role": "assistant", "content": "a"}],
                        "rejected": [{"role": "assistant", "content": "b"}],
                    }
                ),
            ],
            "line 2",
            "message 0",
        ),
        "mixed.jsonl": (
            [GOOD, json.dumps({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"})],
            "line 2",
            "mixes",
        ),
        "blank_lines.jsonl": (
            ["", GOOD, "", json.dumps({"prompt": "p", "chosen": [], "rejected": "b"})],
            "line 4",
            "'chosen'",
        ),
    }
    for name, (lines, where, what) in cases.items():
        path = _write(tmp_path / name, lines)
        line = assert_usage_error(["train", *out, "--data", str(path)], capsys, "--data", str(path), where, what)
        assert "Traceback" not in line
    empty = _write(tmp_path / "empty.jsonl", [])
    assert_usage_error(["train", *out, "--data", str(empty)], capsys, str(empty), "no preference rows")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    assert_usage_error(["train", *out, "--data", str(binary)], capsys, str(binary), "UTF-8")
    txt = _write(tmp_path / "rows.txt", [GOOD])
    assert_usage_error(["train", *out, "--data", str(txt)], capsys, "unsupported preference file type")
    js = tmp_path / "rows.json"
    js.write_text(json.dumps([json.loads(GOOD), {"prompt": "p", "chosen": None, "rejected": "r"}]))
    assert_usage_error(["train", *out, "--data", str(js)], capsys, str(js), "item 1", "'chosen'")
    js.write_text("{not json")
    assert_usage_error(["train", *out, "--data", str(js)], capsys, str(js), "not valid JSON")
    tokenized = _write(
        tmp_path / "tok.jsonl",
        [json.dumps({"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4]})] * 3,
    )
    assert_usage_error(["train", *out, "--data", str(tokenized)], capsys, "pre-tokenized rows need --model")
    negative = _write(
        tmp_path / "neg.jsonl",
        [
            json.dumps({"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4]}),
            json.dumps({"prompt_input_ids": [1, -2], "chosen_input_ids": [3], "rejected_input_ids": [4]}),
        ],
    )
    assert_usage_error(["train", *out, "--data", str(negative)], capsys, "line 2", "'prompt_input_ids'", "-2")
    # --eval-data is checked the same way
    assert_usage_error(["train", *out, "--eval-data", str(tmp_path / "broken.jsonl")], capsys, "--eval-data", "line 3")


def test_train_token_id_outside_vocabulary_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With --model, a pre-tokenized id outside its vocabulary is reported by line (the file's order, not the
    shuffled training order)."""
    from fastdpo.tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    model_dir = tmp_path / "model"
    make_model("llama", tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [json.dumps({"prompt_input_ids": [5, 6], "chosen_input_ids": [7], "rejected_input_ids": [8]})] * 12
    rows[9] = json.dumps({"prompt_input_ids": [5, 6], "chosen_input_ids": [10**6], "rejected_input_ids": [8]})
    data = _write(tmp_path / "ids.jsonl", rows)
    assert_usage_error(
        [
            "train",
            "--output-dir",
            str(tmp_path / "out"),
            "--no-progress",
            "--model",
            str(model_dir),
            "--data",
            str(data),
        ],
        capsys,
        f"{data} line 10",
        "1000000",
        "vocabulary",
    )


def test_train_unknown_loss_type(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert_usage_error(
        [
            "train",
            "--output-dir",
            str(tmp_path / "out"),
            "--no-progress",
            "--hidden-size",
            "16",
            "--layers",
            "1",
            "--loss-type",
            "nope",
        ],
        capsys,
        "--loss-type",
        "nope",
    )
    # the refused run left nothing behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


# -------------------------------------------------------------------------------------------------- fastdpo memory
def _config(tmp_path: Path, name: str, **overrides: object) -> Path:
    cfg = {
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    cfg.update(overrides)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_memory_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [
        *bad_values(
            {
                "--variants": ["", ",,"],
                "--pairs": ["0", "-3", "x"],
                "--prompt-len": ["-1"],
                "--completion-len": ["0"],
                "--layers": ["0"],
                "--pairs-per-row": ["2"],
                "--dtype": ["fp8"],
                "--model": [str(tmp_path / "nope.json")],
            }
        ),
        (["--variants", "naive,magic"], "unknown variant"),
        (["--packing", "prefix_shared", "--pairs-per-row", "0"], "--pairs-per-row"),
        (["--measure", "--device", "cuda"], "--measure"),
        (["--model", str(_config(tmp_path, "zero_heads", num_attention_heads=0))], "num_attention_heads"),
        (["--model", str(_config(tmp_path, "neg_vocab", vocab_size=-5))], "vocab_size"),
        (["--model", str(_config(tmp_path, "neg_hidden", hidden_size=-64))], "hidden_size"),
        (["--model", str(_config(tmp_path, "str_size", intermediate_size="128"))], "intermediate_size"),
        (["--model", str(_config(tmp_path, "kv", num_key_value_heads=3))], "num_key_value_heads"),
        (["--model", str(_config(tmp_path, "zero_layers", num_hidden_layers=0))], "num_hidden_layers"),
        (["--model", str(_config(tmp_path, "softcap", final_logit_softcapping=-1.0))], "final_logit_softcapping"),
        (["--model", str(_config(tmp_path, "text", text_config=[1, 2]))], "not a JSON object"),
    ]
    not_json = tmp_path / "not_json.json"
    not_json.write_text("{oops")
    cases.append((["--model", str(not_json)], "not valid JSON"))
    folder = tmp_path / "cfgdir"
    (folder / "config.json").mkdir(parents=True)  # a folder where the config file should be
    cases.append((["--model", str(folder)], "--model"))
    for args, needle in cases:
        assert_usage_error(["memory", *args], capsys, needle)


# --------------------------------------------------------------------------------------------------- fastdpo bench
def test_bench_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = ["--out", str(tmp_path / "out"), "--quick", "--no-plots"]
    cases = [
        *bad_values(
            {
                "--device": ["bogus", "cuda"],
                "--repeats": ["0", "-1"],
                "--impls": ["", "nope"],
                "--workloads": ["heads", ","],
                "--tokens": ["0", "abc"],
                "--vocab": ["-5"],
                "--time-budget": ["0", "nan"],
                "--max-case-seconds": ["inf"],
                "--total-seconds": ["-1"],
                "--threads": ["0"],
                "--dtype": ["fp64"],
            }
        ),
        (["--tokens", str(10**9), "--vocab", str(10**7)], "--tokens/--hidden/--vocab"),
    ]
    for args, needle in cases:
        assert_usage_error(["bench", *out, *args], capsys, needle)
    assert_usage_error(["bench", "--quick", "--no-plots", "--out", str(a_file)], capsys, "--out", "not a folder")
    assert_usage_error(["bench", "--quick", "--no-plots", "--out", str(a_file / "sub")], capsys, "--out")
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


def test_top_level(capsys: pytest.CaptureFixture) -> None:
    assert_usage_error(["bogus"], capsys, "unknown command")
    assert_usage_error([], capsys, "missing command")
    code, _ = run(["train", "-h"], capsys)
    assert code == 0


def test_real_processes_exit_2_with_one_line(tmp_path: Path) -> None:
    """The installed entry point: the exit status the shell sees is 2 and stderr is one line."""
    for args in (["train", "--lr", "nan"], ["memory", "--variants", ""], ["bench", "--repeats", "0"]):
        proc = subprocess.run(
            [sys.executable, "-m", "fastdpo.cli", *args],
            capture_output=True,
            text=True,
            cwd=str(tmp_path),
            timeout=120,
            check=False,
        )
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_first_line_quotes_one_line_and_survives_an_empty_message() -> None:
    """The one-line errors quote an exception's first line; an exception without a message (``KeyError()`` from a
    checkpoint's state dict) gives an empty quote, not an ``IndexError`` traceback."""
    from fastdpo.cli import first_line

    assert first_line(ValueError("size mismatch\n  details")) == "size mismatch"
    assert first_line(KeyError()) == ""
    assert first_line(RuntimeError("")) == ""
