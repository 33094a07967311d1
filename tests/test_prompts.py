"""Prompt files as people keep them (.txt, .csv, .tsv, .jsonl), through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, load_npz

from calibjob.core.store import JobStore
from calibjob.errors import ConfigError
from calibjob.jobs import open_store
from calibjob.prompts import read_prompts

pytestmark = pytest.mark.e2e

THINGS = ("cats on a sofa", "boats, at dusk", 'signs saying "stop"', "trains")
CAPTIONS = [f"a photo of {n} {t}" for n in ("one", "two", "three", "four", "five") for t in THINGS]


def write_csv(path: Path, header: list[str], rows: list[list[str]], sep: str = ",") -> Path:
    """A table written by hand (quoting every cell), not by the csv module being tested."""
    def cell(s: str) -> str:
        return '"' + s.replace('"', '""') + '"'

    lines = [sep.join(header)] + [sep.join(cell(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_run(prompt_file: Path, store: Path, *extra: str, n: int = 2) -> JobStore:
    cli(
        "run", "--model-version", "tiny", "--prompt-file", str(prompt_file),
        "--num-fid-samples", str(n), "--num-sampling-steps", "2", "--num-selected-steps", "2",
        "--store", str(store), "--no-progress", *extra,
    )  # fmt: skip
    return open_store(store, mode="r")


# ---- each format ---------------------------------------------------------------------------


def test_csv_one_prompt_per_trajectory_end_to_end(tmp_path):
    """COCO-style captions: image_id and caption columns, the caption found by its name,
    --num-prompts 12 of 20 rows, 12 trajectories = one prompt each, merged."""
    rows = [[str(1000 + i), c] for i, c in enumerate(CAPTIONS)]
    f = write_csv(tmp_path / "captions.csv", ["image_id", "caption"], rows)
    store = tmp_path / "coco.zarr"
    st = tiny_run(f, store, "--num-prompts", "12", n=12)
    assert list(st.config.prompts) == CAPTIONS[:12]
    out = tmp_path / "coco.npz"
    cli("merge", str(store), "-o", str(out))
    d = load_npz(out)
    assert d["prompts"].tolist() == CAPTIONS[:12] and d["cs"].shape[0] == 12
    assert np.array_equal(d["prompt_indices"], d["trajectory_indices"])  # one prompt each
    assert sorted(set(d["prompt_indices"].tolist())) == list(range(12))


def test_tsv_with_prompt_column(tmp_path):
    rows = [[c, "x"] for c in CAPTIONS[:4]]
    f = write_csv(tmp_path / "p.tsv", ["Description", "Notes"], rows, sep="\t")
    st = tiny_run(f, tmp_path / "t.zarr", "--prompt-column", "Description")
    assert list(st.config.prompts) == CAPTIONS[:4]


def test_jsonl_default_key(tmp_path):
    f = tmp_path / "p.jsonl"
    lines = [json.dumps({"id": i, "text": c}) for i, c in enumerate(CAPTIONS[:3])]
    f.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n", encoding="utf-8")
    st = tiny_run(f, tmp_path / "j.zarr")
    assert list(st.config.prompts) == CAPTIONS[:3]


def test_txt_as_before(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\n\n  a red fox in snow  \na bowl of ramen\n", encoding="utf-8")
    st = tiny_run(f, tmp_path / "x.zarr", "--num-prompts", "1")
    assert st.config.prompts == ("a red fox in snow",)


def test_readers_pick_columns_and_keys(tmp_path):
    """The default column rules and the formats' details, on the reader itself."""
    only = write_csv(tmp_path / "only.csv", ["words"], [[c] for c in CAPTIONS[:2]])
    assert read_prompts(only) == tuple(CAPTIONS[:2])  # the only column
    both = write_csv(tmp_path / "both.csv", ["Text", "Prompt"], [["t1", "p1"], ["t2", "p2"]])
    assert read_prompts(both) == ("p1", "p2")  # prompt before caption before text, any case
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffcaption\nun café\n".encode())  # Excel's UTF-8 with a BOM
    assert read_prompts(bom) == ("un café",)
    strings = tmp_path / "s.jsonl"
    strings.write_text('"a cat"\n"a dog"\n', encoding="utf-8")
    assert read_prompts(strings) == ("a cat", "a dog")
    one_key = tmp_path / "k.jsonl"
    one_key.write_text('{"desc": "a cat"}\n', encoding="utf-8")
    assert read_prompts(one_key) == ("a cat",)
    # rows after the first N are not read: a bad row 4 does not matter for --num-prompts 2
    late = write_csv(tmp_path / "late.csv", ["caption"], [["a"], ["b"], [""]])
    assert read_prompts(late, first=2) == ("a", "b")
    with pytest.raises(ConfigError):
        read_prompts(late)


def test_json_arrays_of_strings_or_objects(tmp_path):
    """A .json prompt file is one JSON array, read as JSON, not as lines of text."""
    strings = tmp_path / "p.json"
    strings.write_text('[\n  "a red fox in snow",\n  "a blue car"\n]\n', encoding="utf-8")
    assert read_prompts(strings) == ("a red fox in snow", "a blue car")
    objects = tmp_path / "o.json"
    objects.write_text('[{"id": 1, "caption": "a cat"}, {"id": 2, "caption": "a dog"}]')
    assert read_prompts(objects) == ("a cat", "a dog")
    assert read_prompts(objects, first=1) == ("a cat",)
    st = tiny_run(strings, tmp_path / "j.zarr")
    assert st.config.prompts == ("a red fox in snow", "a blue car")


# ---- bad input: one line naming the file, the row and the problem; exit 2; no store ---------


def _bad_cases(d: Path) -> dict[str, tuple[Path, list[str], str]]:
    """case -> (prompt file, extra flags, text the one error line must hold)."""
    d.mkdir(exist_ok=True)
    cases: dict[str, tuple[Path, list[str], str]] = {}
    f = write_csv(d / "cols.csv", ["id", "caption"], [["1", "a cat"], ["2", "a dog"]])
    cases["missing column"] = (f, ["--prompt-column", "title"], "no column 'title'")
    f = write_csv(d / "many.csv", ["id", "url", "alt"], [["1", "u", "a cat"]])
    cases["no prompt column"] = (f, [], "--prompt-column")
    f = write_csv(d / "empty.csv", ["id", "caption"], [["1", "a cat"], ["2", "  "], ["3", "x"]])
    cases["empty cell"] = (f, [], "row 3: empty prompt")
    f = write_csv(d / "nl.csv", ["caption"], [["a cat"], ["a dog\non a mat"]])
    cases["newline in a prompt"] = (f, [], "row 3: the prompt has a line break")
    f = write_csv(d / "dup.csv", ["caption"], [["a cat"], ["a dog"], ["a cat"]])
    cases["duplicate"] = (f, [], "row 4: repeats the prompt of row 2")
    f = d / "latin1.csv"
    f.write_bytes("caption\na cat\nun caf\xe9 au lait\n".encode("latin-1"))
    cases["not UTF-8"] = (f, [], "line 3: not UTF-8")
    f = d / "bad.jsonl"
    f.write_text('{"text": "a cat"}\n{"text": "a dog"\n', encoding="utf-8")
    cases["jsonl not JSON"] = (f, [], "line 2: not JSON")
    f = d / "num.jsonl"
    f.write_text('{"caption": "a cat"}\n{"caption": 7}\n', encoding="utf-8")
    cases["jsonl not text"] = (f, [], "line 2: 'caption' is a number, not text")
    f = d / "key.jsonl"
    f.write_text('{"caption": "a cat"}\n{"alt": "a dog"}\n', encoding="utf-8")
    cases["jsonl missing key"] = (f, ["--prompt-column", "caption"], "line 2: no key 'caption'")
    f = d / "dup.txt"
    f.write_text("a cat\na dog\na cat\n", encoding="utf-8")
    cases["txt duplicate"] = (f, [], "line 3: repeats the prompt of line 1")
    f = write_csv(d / "few.csv", ["caption"], [["a cat"], ["a dog"]])
    cases["too few prompts"] = (f, ["--num-prompts", "5"], "has only 2 prompts")
    f = d / "plain.txt"
    f.write_text("a cat\n", encoding="utf-8")
    cases["column on a txt"] = (f, ["--prompt-column", "caption"], "applies to .csv")
    f = d / "obj.json"
    f.write_text('{"prompts": ["a cat"]}', encoding="utf-8")
    cases["json not an array"] = (f, [], "expected a JSON array of prompts, got an object")
    f = d / "nums.json"
    f.write_text('["a cat", 7]', encoding="utf-8")
    cases["json item not text"] = (f, [], "item 2: expected a JSON object, got a number")
    f = d / "notes.md"
    f.write_text("a cat\n", encoding="utf-8")
    cases["unknown suffix"] = (f, [], "ending in .txt, .csv, .tsv, .json, .jsonl")
    return cases


BAD = [
    "missing column", "no prompt column", "empty cell", "newline in a prompt", "duplicate",
    "not UTF-8", "jsonl not JSON", "jsonl not text", "jsonl missing key", "txt duplicate",
    "too few prompts", "column on a txt", "json not an array", "json item not text",
    "unknown suffix",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_prompt_file_is_one_line_and_no_store(case, tmp_path):
    f, extra, says = _bad_cases(tmp_path / "in")[case]
    store = tmp_path / "s.zarr"
    proc = cli(
        "run", "--model-version", "tiny", "--prompt-file", str(f), "--store", str(store),
        *extra, check=False,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("calibjob: error:"), proc.stderr
    assert says in lines[0], lines[0]
    assert f.name in lines[0], lines[0]
    assert not store.exists()
