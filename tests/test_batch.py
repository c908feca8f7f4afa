"""t2i batch on a tiny saved pipeline: items and ids, bad input, outputs, resume after SIGKILL, batch-size and order
independence, 2-process sharding, --from-image, --merge, and the gallery in a headless browser."""
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from t2i.cli import main
from t2i.errors import T2IError
from t2i.jobs.items import FIELDS, ImageTask, JobDefaults, read_items
from t2i.jobs.parameters import format_parameters, parse_parameters
from t2i.jobs.processes import owner_rank
from t2i.jobs.run import BatchJob, padding_notice, run_batch_job
from t2i.training.interrupt import StopNow

from conftest import REPO

PROMPTS = ["a large red circle", "a small blue square", "a white triangle at the top", "a green circle",
           "a yellow square on the left"]
DEFAULTS = JobDefaults(negative_prompt="", seed=0, steps=2, guidance=3.0, sampler="dpmpp_2m", height=32, width=32,
                       num_images=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the subprocesses: the jobs compare pixels across processes, and on a busy
    2-core machine two OpenMP threads spent most of their time waiting for each other (docs/batch.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_pipeline, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("batch") / "pipe"
    tiny_pipeline.save_pretrained(path)
    return path


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run(model, prompts, out, **options) -> object:
    return run_batch_job(BatchJob(model, prompts, out, device="cpu", progress=False, **{"steps": 2, **options}))


def images_of(out: Path) -> dict[str, np.ndarray]:
    return {path.name: np.asarray(Image.open(path)).astype(np.int16) for path in sorted((out / "images").glob("*"))}


def manifest_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------- items

def test_txt_lines_are_items_blank_lines_are_skipped_and_ids_survive_reordering(tmp_path):
    forward, _ = read_items(write(tmp_path / "a.txt", ["a red circle", "", "  ", "a blue square", "a red circle"]),
                            DEFAULTS, 8)
    backward, _ = read_items(write(tmp_path / "b.txt", ["a blue square", "a red circle", "a red circle"]), DEFAULTS, 8)
    assert [item.line for item in forward] == [1, 4, 5]
    assert len({item.id for item in forward}) == 3  # the repeated line is an item of its own
    assert {item.id for item in forward} == {item.id for item in backward}
    assert all(len(item.id) == 12 and item.id.isalnum() for item in forward)


def test_txt_comment_lines_are_not_items_and_change_no_id_but_jsonl_and_csv_prompts_may_start_with_a_hash(tmp_path):
    plain, _ = read_items(write(tmp_path / "plain.txt", ["a red circle", "a red circle", "a blue square #2"]),
                          DEFAULTS, 8)
    commented, problems = read_items(write(tmp_path / "commented.txt", [
        "# portraits, second set", "a red circle", "  # a red circle", "#a red circle", "a red circle",
        "\t#", "a blue square #2"]), DEFAULTS, 8)
    assert problems == []
    assert [(item.line, item.prompt) for item in commented] == [(2, "a red circle"), (5, "a red circle"),
                                                                (7, "a blue square #2")]
    assert [item.id for item in commented] == [item.id for item in plain]  # the repeat count skips the comments
    jsonl = write(tmp_path / "p.jsonl", [{"prompt": "# a red circle"}])
    csv = write(tmp_path / "p.csv", ["prompt", "# a red circle"])
    for path in (jsonl, csv):
        assert [item.prompt for item in read_items(path, DEFAULTS, 8)[0]] == ["# a red circle"]


def test_blank_jsonl_lines_and_empty_csv_rows_are_skipped_as_the_readme_says(tmp_path):
    jsonl = write(tmp_path / "p.jsonl", ['{"prompt": "a red circle"}', "", "  ", '{"prompt": "a blue square"}'])
    csv = write(tmp_path / "p.csv", ["id,prompt,seed", "x1,a red circle,3", ",,", "", "x2,a blue square,"])
    for path, lines in ((jsonl, [1, 4]), (csv, [2, 5])):
        items, problems = read_items(path, DEFAULTS, 8)
        assert [item.line for item in items] == lines and problems == []


def test_lines_split_at_newlines_only_not_at_unicode_separators_inside_prompts(tmp_path):
    prompts = ["red\u2028circle", "blue\x85square", "green\x1csquare"]
    (tmp_path / "p.txt").write_text("\r\n".join(prompts) + "\r\n", encoding="utf-8", newline="")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": prompt}, ensure_ascii=False)
                                                for prompt in prompts) + "\n", encoding="utf-8")
    for name in ("p.txt", "p.jsonl"):
        items, problems = read_items(tmp_path / name, DEFAULTS, 8)
        assert problems == []
        assert [(item.line, item.prompt) for item in items] == [(1, prompts[0]), (2, prompts[1]), (3, prompts[2])]


def test_a_quoted_csv_cell_keeps_its_line_break(tmp_path):
    (tmp_path / "p.csv").write_text('prompt,seed\r\n"a red\ncircle",1\r\n"say ""hi"", twice",2\r\n', newline="")
    items, problems = read_items(tmp_path / "p.csv", DEFAULTS, 8)
    assert problems == []
    assert [(item.prompt, item.seed) for item in items] == [("a red\ncircle", 1), ('say "hi", twice', 2)]


def test_a_guidance_that_is_not_finite_is_an_invalid_line(model, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "guidance": NaN}\n{"prompt": "b", "guidance": Infinity}\n')
    (tmp_path / "p.csv").write_text("prompt,guidance\nc,nan\n")
    for name in ("p.jsonl", "p.csv"):
        items, problems = read_items(tmp_path / name, DEFAULTS, 8)
        assert items == [] and all("guidance must be a finite number" in str(problem) for problem in problems)
    prompts = write(tmp_path / "p.txt", ["a red circle"])
    assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                 "--guidance", "nan"]) == 2
    assert "--guidance: guidance must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "out" / "images").exists()


def test_fields_from_jsonl_and_csv_agree_and_the_defaults_fill_the_rest(tmp_path):
    jsonl, _ = read_items(write(tmp_path / "p.jsonl", [{"prompt": "a red circle", "steps": 3, "guidance": 2.5},
                                                      {"prompt": "a blue square", "id": "blue", "seed": 7}]),
                          DEFAULTS, 8)
    csv, _ = read_items(write(tmp_path / "p.csv", ["prompt,steps,guidance,id,seed", "a red circle,3,2.5,,",
                                                   "a blue square,,,blue,7"]), DEFAULTS, 8)
    assert [(i.id, i.steps, i.guidance, i.seed, i.sampler) for i in jsonl] == \
        [(i.id, i.steps, i.guidance, i.seed, i.sampler) for i in csv]
    assert (jsonl[0].steps, jsonl[0].guidance, jsonl[0].sampler, jsonl[0].seed) == (3, 2.5, "dpmpp_2m", None)
    assert (jsonl[1].id, jsonl[1].seed, jsonl[1].steps) == ("blue", 7, 2)


@pytest.mark.parametrize("bad_id", ["../evil", "a/b", "a\\b", "..", ".hidden", "", "x" * 65, "a b", "a..b", 3])
def test_unsafe_ids_are_invalid(tmp_path, bad_id):
    items, problems = read_items(write(tmp_path / "p.jsonl", [{"prompt": "a red circle", "id": bad_id}]), DEFAULTS, 8)
    assert items == [] and len(problems) == 1 and "not a safe file name" in str(problems[0])


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"prompt": "a red circle", "colour": "red"}, "unknown key 'colour'"),
    ({"prompt": "   "}, "empty prompt"),
    ({"negative_prompt": "blurry"}, "empty prompt"),
    ({"prompt": "a red circle", "height": 31}, "height 31 is not a positive multiple of the VAE's latent factor 2"),
    ({"prompt": "a red circle", "width": 0}, "width 0 is not a positive multiple"),
    ({"prompt": "a red circle", "steps": 0}, "steps must be at least 1"),
    ({"prompt": "a red circle", "steps": -3}, "steps must be at least 1"),
    ({"prompt": "a red circle", "sampler": "plms"}, "unknown sampler 'plms'"),
    ({"prompt": "a red circle", "seed": "7"}, "seed must be an integer"),
    ({"prompt": "a red circle", "num_images": 0}, "num_images must be at least 1"),
    ({"prompt": "a red circle", "num_images": 100_000_000}, "num_images 100000000 is above the limit of 10,000 images "
                                                            "per item"),
    ({"prompt": "a red circle", "id": "x/y"}, "id 'x/y' is not a safe file name"),
    ({"prompt": "a red \ud800 circle"}, "prompt is not valid Unicode: lone surrogate '\\ud800' at character 7"),
    ({"prompt": "a red circle", "negative_prompt": "\udfff"}, "negative_prompt is not valid Unicode"),
    ({"prompt": "a blue square", "id": "first"}, "duplicate id 'first' (first on line 1)"),
    ({"prompt": "a blue square", "id": "First"}, "id 'First' differs from id 'first' (line 1) only in case"),
]


def test_every_bad_line_is_listed_with_its_line_number_and_nothing_is_written(model, tmp_path):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "a red circle", "id": "first"}, *[line for line, _ in BAD_LINES]])
    out = tmp_path / "out"
    with pytest.raises(T2IError) as error:
        run(model, prompts, out)
    for number, (_, message) in enumerate(BAD_LINES, 2):
        assert f"line {number}: {message}" in str(error.value)
    assert f"{len(BAD_LINES)} invalid line(s)" in str(error.value)
    assert not out.exists()


def test_csv_with_an_unknown_column_or_a_short_row_is_refused(model, tmp_path):
    _, problems = read_items(write(tmp_path / "a.csv", ["prompt,colour", "a red circle,red"]), DEFAULTS, 8)
    assert [str(problem) for problem in problems] == ["line 1: unknown column 'colour'; known: id, prompt, "
                                                      "negative_prompt, seed, steps, guidance, sampler, height, "
                                                      "width, num_images"]
    _, problems = read_items(write(tmp_path / "b.csv", ["prompt,steps", "a red circle,2,9", "", "x,two"]), DEFAULTS, 8)
    assert [str(problem) for problem in problems] == ["line 2: 3 cells for 2 columns; put a cell that holds a comma "
                                                      "in double quotes",
                                                      "line 4: steps must be an integer, got 'two'"]
    _, problems = read_items(write(tmp_path / "c.csv", ["prompt,steps", "a red circle"]), DEFAULTS, 8)
    assert [str(problem) for problem in problems] == ["line 2: 1 cell for 2 columns"]


def test_skip_invalid_reports_the_bad_lines_and_runs_the_rest(model, tmp_path, capsys):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "a red circle"}, {"prompt": ""}, {"prompt": "a blue square"}])
    summary = run(model, prompts, tmp_path / "out", skip_invalid=True)
    assert (summary.generated, summary.invalid_lines) == (2, 1)
    assert "line 2: empty prompt" in capsys.readouterr().err
    assert len(manifest_of(tmp_path / "out")) == 2


def test_a_missing_or_unknown_prompt_file_is_one_clear_error(model, tmp_path, capsys):
    assert main(["batch", "--model", str(model), "--prompts", str(tmp_path / "no.txt"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "prompt file" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text("- a red circle\n")
    assert main(["batch", "--model", str(model), "--prompts", str(tmp_path / "p.yaml"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "must end in .txt, .jsonl or .csv" in err and "Traceback" not in err


def test_a_file_named_images_in_the_output_folder_is_one_clear_error(model, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "images").write_text("notes")  # was a FileExistsError traceback from mkdir
    assert main(["batch", "--model", str(model), "--prompts", str(write(tmp_path / "p.txt", ["a red circle"])),
                 "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'o' / 'images'}' is a file; t2i batch writes its images into a folder" in err
    assert "Traceback" not in err and (tmp_path / "o" / "images").read_text() == "notes"


def test_prompt_file_suffixes_are_read_in_any_case(tmp_path):
    write(tmp_path / "PROMPTS.TXT", ["a red circle", "a blue square"])
    write(tmp_path / "p.JSONL", [{"prompt": "a red circle", "id": "red"}])
    write(tmp_path / "p.Csv", ["id,prompt", "blue,a blue square"])
    read = {name: read_items(tmp_path / name, DEFAULTS, 8) for name in ("PROMPTS.TXT", "p.JSONL", "p.Csv")}
    assert [item.prompt for item in read["PROMPTS.TXT"][0]] == ["a red circle", "a blue square"]
    assert [item.id for item in read["p.JSONL"][0]] == ["red"]
    assert [item.id for item in read["p.Csv"][0]] == ["blue"]
    assert all(problems == [] for _, problems in read.values())


def test_a_prompt_file_with_nothing_to_make_is_refused_and_leaves_the_job_folder_as_it_is(model, tmp_path, capsys):
    out = tmp_path / "out"
    run(model, write(tmp_path / "p.txt", PROMPTS[:2]), out)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    (tmp_path / "empty.txt").write_text("\n  \n# portraits, second set\n")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    (tmp_path / "heading.csv").write_text("prompt,seed\n\n")
    write(tmp_path / "bad.jsonl", [{"prompt": ""}])
    for name, message in (("empty.txt", "has no prompts (every line is blank or a comment)"),
                          ("empty.jsonl", "has no prompts (every line is blank)"),
                          ("heading.csv", "has no prompts (no rows below a heading line)"),
                          ("bad.jsonl", "has no valid items")):
        assert main(["batch", "--model", str(model), "--prompts", str(tmp_path / name), "--out", str(out),
                     "--steps", "2", "--device", "cpu", "--skip-invalid"]) == 2
        assert message in capsys.readouterr().err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_a_utf16_prompt_file_is_named_as_such(tmp_path):
    for encoding in ("utf-16", "utf-16-be"):
        (tmp_path / "p.txt").write_bytes(("\ufeff" if encoding.endswith("be") else "").encode(encoding) +
                                         "a red circle\r\n".encode(encoding))
        with pytest.raises(T2IError, match="is UTF-16 text; save it as UTF-8"):
            read_items(tmp_path / "p.txt", DEFAULTS, 8)


def test_prompts_with_unicode_line_separators_keep_their_manifest_records(model, tmp_path):
    prompts = ["red\u2028circle", "blue\x85square", "green\x1csquare", "plain"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    run(model, tmp_path / "p.txt", out)
    assert sorted(record["prompt"] for record in manifest_of_lines(out)) == sorted(prompts)
    assert run(model, tmp_path / "p.txt", out).generated == 0
    assert sorted(record["prompt"] for record in manifest_of_lines(out)) == sorted(prompts)
    assert "<p>4 images." in (out / "index.html").read_text()


def manifest_of_lines(out: Path) -> list[dict]:
    """The manifest read as JSON Lines are: one record per "\n"-ended line."""
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").split("\n") if line]


def test_csv_headings_are_read_in_any_case_and_a_semicolon_separated_file_is_named(tmp_path):
    items, problems = read_items(write(tmp_path / "a.csv", ["Prompt, SEED", "a red circle,7"]), DEFAULTS, 8)
    assert problems == [] and [(item.prompt, item.seed) for item in items] == [("a red circle", 7)]
    _, problems = read_items(write(tmp_path / "b.csv", ["prompt;seed", "a red circle;7"]), DEFAULTS, 8)
    assert [str(problem) for problem in problems] == [
        f"line 1: unknown column 'prompt;seed'; known: {', '.join(FIELDS)}; the file looks semicolon-separated: save "
        "it comma-separated"]


def test_a_bad_option_is_named_once_not_blamed_on_every_line(model, tmp_path, capsys):
    prompts = write(tmp_path / "p.txt", PROMPTS[:3])
    for option, value in (("--steps", "0"), ("--num-images", "0"), ("--height", "0"), ("--negative", "blur\udcff")):
        assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                     option, value]) == 2
        err = capsys.readouterr().err
        assert err.count(f"error: {option}: ") == 1 and "line" not in err
    assert not (tmp_path / "o").exists()


def test_a_job_too_large_to_plan_is_refused_up_front_naming_the_limit(model, tmp_path, capsys, monkeypatch):
    prompts = write(tmp_path / "p.txt", PROMPTS[:3])
    assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--num-images", "100000000"]) == 2
    assert "--num-images: num_images 100000000 is above the limit of 10,000 images per item" in capsys.readouterr().err
    monkeypatch.setattr("t2i.jobs.items.MAX_IMAGES_PER_JOB", 5)  # 3 items x 2 images: one too many
    assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--num-images", "2"]) == 2
    err = capsys.readouterr().err
    assert "asks for 6 images, more than the 5 one job makes; split it into several files" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_a_size_too_large_to_decode_is_an_invalid_line_or_a_named_option_not_an_out_of_memory_kill(model, tmp_path,
                                                                                                    capsys):
    huge = 2**20
    prompts = write(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "height": huge, "width": huge}])
    with pytest.raises(T2IError, match=f"line 2: {huge}x{huge} at batch 4 needs at least .* GiB to sample and decode"):
        run(model, prompts, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert run(model, prompts, tmp_path / "out", skip_invalid=True).generated == 1
    capsys.readouterr()
    assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--height", str(huge), "--width", str(huge)]) == 2
    err = capsys.readouterr().err
    assert err.count(f"error: --height/--width/--batch-size: {huge}x{huge} at batch 4 needs") == 1 and "line" not in err
    assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--batch-size", "100000000"]) == 2
    assert "error: --height/--width/--batch-size: 32x32 at batch 100000000 needs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_byte_order_marks_of_spreadsheet_exports_are_dropped(model, tmp_path):
    bom = "\ufeff"
    (tmp_path / "p.csv").write_text(bom + "id,prompt\nred,a red circle\n", encoding="utf-8")
    (tmp_path / "p.txt").write_text(bom + "a blue square\n", encoding="utf-8")
    items = [read_items(tmp_path / name, DEFAULTS, 2)[0][0] for name in ("p.csv", "p.txt")]
    assert [(item.id, item.prompt) for item in items][0] == ("red", "a red circle")
    assert items[1].prompt == "a blue square"


# ----------------------------------------------------------------- outputs

def test_outputs_png_parameters_manifest_and_job_file(model, tmp_path):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "a red circle, big", "negative_prompt": "blurry", "id": "red",
                                            "seed": 5, "num_images": 2}, {"prompt": "a blue square"}])
    out = tmp_path / "out"
    run(model, prompts, out, guidance=2.5, sampler="euler")
    records = manifest_of(out)
    assert [(r["id"], r["k"]) for r in records] == sorted((r["id"], r["k"]) for r in records)
    assert [r["seed"] for r in records if r["id"] == "red"] == [5, 6]
    for record in records:
        data = (out / record["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        assert {"prompt", "negative_prompt", "steps", "guidance", "sampler", "height", "width", "model",
                "model_hash"} <= set(record)
    text = Image.open(out / "images" / "red-1.png").info["parameters"]
    assert text.startswith('a red circle, big\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, CFG scale: 2.5, '
                           'Seed: 6, Size: 32x32, Model hash: ')
    assert parse_parameters(text)["prompt"] == "a red circle, big"
    job = json.loads((out / "job.json").read_text())
    assert job["defaults"]["guidance"] == 2.5 and job["model_hash"] == records[0]["model_hash"]
    assert not list(out.glob("manifest.rank-*")) and not list((out / "images").glob(".*"))


def test_rerun_with_other_defaults_is_refused_unless_forced(model, tmp_path):
    prompts = write(tmp_path / "p.txt", ["a red circle"])
    out = tmp_path / "out"
    run(model, prompts, out)
    before = manifest_of(out)
    with pytest.raises(T2IError, match="other settings \\(defaults: was "):
        run(model, prompts, out, steps=3)
    summary = run(model, prompts, out, steps=3, force=True)
    assert summary.generated == 1
    after = manifest_of(out)
    assert after[0]["steps"] == 3 and after[0]["sha256"] != before[0]["sha256"]


def test_a_resume_in_another_number_format_is_refused_unless_forced(model, tmp_path):
    """bf16 moves a rare image beyond rounding (docs/batch.md), so a job resumed in another format would mix them;
    an "auto" job resumed on a machine whose default differs is caught the same way, by the resolved format."""
    out = tmp_path / "out"
    run(model, write(tmp_path / "p.txt", ["a red circle"]), out, dtype="fp32")
    job = json.loads((out / "job.json").read_text())
    assert (job["dtype"], job["compile"]) == ("fp32", "off")
    more = write(tmp_path / "q.txt", ["a red circle", "a blue square"])
    with pytest.raises(T2IError, match="dtype: was fp32, now bf16\\); rerun with --dtype fp32, use another --out"):
        run(model, more, out, dtype="bf16")
    assert run(model, more, out, dtype="fp32").generated == 1
    assert run(model, write(tmp_path / "r.txt", ["a green circle"]), out, dtype="bf16", force=True).generated == 1
    assert json.loads((out / "job.json").read_text())["dtype"] == "bf16"


def test_a_job_file_from_before_the_number_format_was_recorded_is_accepted(model, tmp_path):
    out = tmp_path / "out"
    run(model, write(tmp_path / "p.txt", ["a red circle"]), out)
    job = json.loads((out / "job.json").read_text())
    del job["dtype"], job["compile"]
    (out / "job.json").write_text(json.dumps(job))
    assert run(model, write(tmp_path / "q.txt", ["a blue square"]), out, dtype="bf16").generated == 1
    (out / "job.json").write_text("[]")
    with pytest.raises(T2IError, match="is not a job record"):
        run(model, write(tmp_path / "q.txt", ["a blue square"]), out)


def test_a_changed_item_under_an_old_id_is_refused_unless_forced(model, tmp_path):
    out = tmp_path / "out"
    run(model, write(tmp_path / "p.jsonl", [{"prompt": "a red circle", "id": "one"}]), out)
    changed = write(tmp_path / "q.jsonl", [{"prompt": "a blue square", "id": "one"}])
    with pytest.raises(T2IError, match="made with other parameters"):
        run(model, changed, out)
    run(model, changed, out, force=True)
    assert manifest_of(out)[0]["prompt"] == "a blue square"


def test_a_copied_or_renamed_model_continues_the_job(model, tmp_path):
    out = tmp_path / "out"
    prompts = write(tmp_path / "p.txt", PROMPTS[:2])
    run(model, prompts, out)
    before = images_of(out)
    renamed = tmp_path / "renamed"
    shutil.copytree(model, renamed)
    (out / "manifest.jsonl").unlink()  # the embedded parameters decide alone, as after a crash before the manifest
    summary = run(renamed, write(tmp_path / "q.txt", PROMPTS[:3]), out)
    assert (summary.generated, summary.already_done) == (1, 2)
    assert {name: image for name, image in images_of(out).items() if name in before}.keys() == before.keys()


def test_malformed_embedded_parameters_are_one_clear_error():
    with pytest.raises(T2IError, match="malformed: unterminated quoted value"):
        parse_parameters('a red circle\nSteps: 2, Sampler: "Euler, CFG scale: 3, Seed: 1, Size: 32x32')


def test_parameters_text_round_trips_awkward_values():
    task = ImageTask("x", 0, 123, 'a "red", circle: big\nsecond line', "no: blur, please", 7, 0.1 + 0.2, "euler_a",
                     48, 64)
    parsed = parse_parameters(format_parameters(task, "model, v2", "abcdef0123"))
    assert (parsed["prompt"], parsed["negative_prompt"], parsed["guidance"], parsed["sampler"]) == \
        (task.prompt, task.negative_prompt, task.guidance, "euler_a")
    assert (parsed["height"], parsed["width"], parsed["seed"], parsed["model"]) == (48, 64, 123, "model, v2")


# ----------------------------------------------------------------- identity and resume

def test_a_truncated_prompt_warning_gets_a_line_of_its_own_not_the_progress_bars(model, tmp_path, capsys):
    prompts = write(tmp_path / "p.txt", ["a red circle" + " and a blue square" * 100])
    assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--steps",
                 "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("t2i: warning: prompt truncated to the text encoder's") for line in lines)
    assert not any("img/s]t2i: warning" in line for line in lines)


def test_a_job_mostly_made_of_padding_says_so_once_and_names_a_batch_size_without_it(model, tmp_path, capsys):
    prompts = write(tmp_path / "p.txt", PROMPTS[:3])
    run(model, prompts, tmp_path / "at-8", batch_size=8)
    assert capsys.readouterr().err.count("images computed are padding") == 1
    run(model, prompts, tmp_path / "at-8", batch_size=8)  # all done: nothing computed, nothing to say
    run(model, prompts, tmp_path / "at-3", batch_size=3)
    assert "padding" not in capsys.readouterr().err
    assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "cli"),
                 "--steps", "2", "--device", "cpu", "--batch-size", "8"]) == 0
    assert ("t2i batch: 3 images in batches of 8: 5 of the 8 images computed are padding (batches are padded to full "
            "size so that each image's pixels are the same in any rerun); --batch-size 3 would make as many batches, "
            "with no padding\n") in capsys.readouterr().err


def padding_line(group_sizes: list[int], batch_size: int, suggest: bool = True) -> str | None:
    tasks = [ImageTask(f"i{steps}-{n}", 0, 0, "p", "", steps, 3.0, "dpmpp_2m", 32, 32)
             for steps, size in enumerate(group_sizes, 1) for n in range(size)]
    return padding_notice(tasks, batch_size, suggest)


def test_padding_is_counted_per_group_and_the_batch_size_named_keeps_the_number_of_batches():
    assert padding_line([3], 4) is None  # 1 of 4 computed: a quarter is not worth a line
    assert padding_line([100], 8) is None  # 4 of 104
    assert padding_line([5, 3], 8).startswith("t2i batch: 8 images in batches of 8: 8 of the 16 images computed")
    assert padding_line([5, 3], 8).endswith("--batch-size 5 would make as many batches, with 2 image(s) of padding")
    assert padding_line([9], 8).endswith("--batch-size 5 would make as many batches, with 1 image(s) of padding")
    assert padding_line([8, 1], 8).endswith("the same in any rerun)")  # any smaller size makes more batches
    assert padding_line([3], 8, suggest=False).endswith("the same in any rerun)")  # a resume keeps its batch size


def test_same_images_whatever_the_order_and_the_batch_size(model, tmp_path):
    items = [{"prompt": p, "num_images": 2} for p in PROMPTS] + [{"prompt": "a red circle", "steps": 3}]
    run(model, write(tmp_path / "a.jsonl", items), tmp_path / "a", batch_size=3)
    run(model, write(tmp_path / "b.jsonl", items[::-1]), tmp_path / "b", batch_size=3)
    run(model, write(tmp_path / "c.jsonl", items), tmp_path / "c", batch_size=1)
    a, b, c = (images_of(tmp_path / name) for name in "abc")
    assert len(a) == 11 and a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert manifest_of(tmp_path / "a") == manifest_of(tmp_path / "b")
    assert max(np.abs(a[name] - c[name]).max() for name in a) <= 2


def test_resume_makes_only_what_is_missing_and_repairs_a_cut_manifest(model, tmp_path):
    prompts = write(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "out"
    run(model, prompts, out, batch_size=2, num_images=2)
    reference_images, reference_manifest = images_of(out), manifest_of(out)

    # A crash's leftovers: two images never written, one half-written temporary, a cut manifest line, and an
    # image whose record never made it to the manifest.
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    names = [record["file"] for record in reference_manifest]
    for name in names[:2]:
        (out / name).unlink()
    (out / "images" / f".{Path(names[0]).name}.tmp").write_bytes(b"\x89PNG half")
    (out / "manifest.jsonl").unlink()
    (out / "manifest.rank-0.jsonl").write_text("".join(lines[2:-2]) + lines[-1][:25])

    summary = run(model, prompts, out, batch_size=2, num_images=2)
    assert (summary.generated, summary.already_done) == (2, 8)
    assert images_of(out).keys() == reference_images.keys()
    assert all(np.array_equal(images_of(out)[name], reference_images[name]) for name in reference_images)
    assert manifest_of(out) == reference_manifest
    assert not list((out / "images").glob(".*"))


def test_an_image_damaged_after_it_was_made_is_made_again_and_a_re_encoded_one_is_kept(model, tmp_path, capsys):
    prompts = write(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "out"
    run(model, prompts, out)
    reference = images_of(out)
    names = sorted(reference)
    (out / "images" / names[0]).write_bytes(b"not a png at all")
    whole = (out / "images" / names[1]).read_bytes()
    (out / "images" / names[1]).write_bytes(whole[: len(whole) // 2])
    with Image.open(out / "images" / names[2]) as image:  # re-encoded, its parameters kept: still this job's image
        info = PngInfo()
        info.add_text("parameters", image.info["parameters"])
        image.save(out / "images" / names[2], pnginfo=info, compress_level=0)
    capsys.readouterr()

    summary = run(model, prompts, out)
    assert (summary.generated, summary.already_done) == (2, 3)
    assert "2 image(s) in" in capsys.readouterr().err
    assert all(np.array_equal(images_of(out)[name], reference[name]) for name in names)
    recorded = {record["file"]: record["sha256"] for record in manifest_of(out)}
    assert all(recorded[f"images/{name}"] == hashlib.sha256((out / "images" / name).read_bytes()).hexdigest()
               for name in names)


def test_a_full_disk_stops_the_job_with_one_clear_line_and_a_rerun_finishes_it(model, tmp_path, capsys, monkeypatch):
    prompts = write(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "out"
    real_fsync, calls = os.fsync, [0]

    def fsync_until_the_disk_is_full(descriptor):
        calls[0] += 1
        if calls[0] > 3:  # job.json and two images fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync_until_the_disk_is_full)
    assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", "2",
                 "--device", "cpu", "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "images/" in err and "No space left on device; make room or fix the folder, then rerun" in err
    assert "Traceback" not in err
    assert len(list((out / "images").iterdir())) == 2  # two whole images, no temporary left taking space
    monkeypatch.undo()
    summary = run(model, prompts, out, batch_size=1)
    assert (summary.generated, summary.already_done) == (3, 2) and len(manifest_of(out)) == 5


def test_an_item_whose_sampling_goes_non_finite_is_skipped_and_reported_and_the_rest_are_made(model, tmp_path,
                                                                                              capsys):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "guidance": 1e308},
                                           {"prompt": PROMPTS[2]}])
    out = tmp_path / "out"
    assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", "2",
                 "--device", "cpu"]) == 2
    printed, err = capsys.readouterr()
    assert printed.startswith("3 images: 2 generated (")  # the summary is printed before the error ends the command
    assert (f"0 already done, 1 could not be made, 0 invalid lines skipped; {out / 'manifest.jsonl'}, "
            f"{out / 'index.html'}") in printed
    assert "1 image(s) could not be made: sampler 'dpmpp_2m' produced non-finite latents" in err
    assert f"line 2 of '{prompts}'); the other 2 are done and listed" in err and "Traceback" not in err
    assert sorted(record["prompt"] for record in manifest_of(out)) == [PROMPTS[0], PROMPTS[2]]
    assert "<p>2 images." in (out / "index.html").read_text()


def test_a_model_whose_unet_gives_non_finite_predictions_stops_the_job_at_its_first_batch(model, tmp_path, capsys,
                                                                                          monkeypatch):
    """Every batch would fail alike: skipping them one by one ran the whole job for nothing."""
    from safetensors.torch import load_file, save_file

    from t2i import Text2ImagePipeline

    diverged = tmp_path / "diverged"
    shutil.copytree(model, diverged)
    weights = diverged / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({name: torch.full_like(tensor, float("nan")) for name, tensor in load_file(weights).items()}, weights)
    calls = []
    denoise = Text2ImagePipeline.denoise
    monkeypatch.setattr(Text2ImagePipeline, "denoise", lambda self, *args, **kw: calls.append(1) or
                        denoise(self, *args, **kw))
    assert main(["batch", "--model", str(diverged), "--prompts", str(write(tmp_path / "p.txt", PROMPTS[:3])),
                 "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "1", "--device", "cpu"]) == 2
    assert "the U-Net's predictions are not finite" in capsys.readouterr().err
    assert len(calls) == 1


def _saved_command(model, prompts, out, *options) -> list[str]:
    return [sys.executable, "-m", "t2i.cli", "batch", "--model", str(model), "--prompts", str(prompts),
            "--out", str(out), "--steps", "2", "--device", "cpu", *options]


def _environment(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", **extra}


def test_a_job_killed_with_sigkill_resumes_without_losing_or_duplicating(model, tmp_path):
    prompts = write(tmp_path / "p.txt", [f"{p} number {i}" for i in range(4) for p in PROMPTS[:4]])  # 16 items
    out = tmp_path / "out"
    # Steps high enough that the job is still running when the first images land.
    job = subprocess.Popen(_saved_command(model, prompts, out, "--steps", "12", "--batch-size", "2"),
                           env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((out / "images").glob("*.png"))) < 4:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done_before = len(list((out / "images").glob("*.png")))
    assert 4 <= done_before < 16, "the job was not killed mid-way"
    assert not (out / "index.html").exists()

    summary = run(model, prompts, out, steps=12, batch_size=2)
    assert summary.generated == 16 - done_before
    run(model, prompts, tmp_path / "whole", steps=12, batch_size=2)
    assert manifest_of(out) == manifest_of(tmp_path / "whole")
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(p.name for p in (tmp_path / "whole" /
                                                                                         "images").iterdir())
    assert len({(r["id"], r["k"]) for r in manifest_of(out)}) == 16


@pytest.mark.parametrize("stop", [KeyboardInterrupt, lambda: StopNow(signal.SIGTERM)])
def test_ctrl_c_or_sigterm_says_how_to_continue_and_frees_the_folder(model, tmp_path, capsys, monkeypatch, stop):
    prompts = write(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise stop()

    monkeypatch.setattr("t2i.jobs.run._generate", interrupted)
    code = main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", "2",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code in (128 + signal.SIGINT, 128 + signal.SIGTERM) and "Traceback" not in err
    assert err.rstrip().endswith("; rerun the same command to continue (the images made so far are kept)")
    assert not (out / "t2i.lock").exists()


def test_two_processes_share_the_items_without_overlap(model, tmp_path):
    prompts = write(tmp_path / "p.txt", [f"{p} {i}" for i in range(2) for p in PROMPTS])
    out = tmp_path / "out"
    port = str(29500 + os.getpid() % 1000)
    jobs = [subprocess.Popen(_saved_command(model, prompts, out, "--batch-size", "2"),
                             env=_environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                              LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                              GLOO_SOCKET_IFNAME="lo"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [job.communicate(timeout=120)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    shares = [int(text.strip().splitlines()[-1].split()[0]) for text in outputs]
    assert sorted(shares) != [0, 10] and sum(shares) == 10
    # Both sides run 1 thread (fixture one_thread): thread counts, like batch sizes, may change a sum's last bits.
    run(model, prompts, tmp_path / "one", batch_size=2)
    assert manifest_of(out) == manifest_of(tmp_path / "one")
    assert not list(out.glob("manifest.rank-*"))
    ranks = {owner_rank(record["id"], 2) for record in manifest_of(out)}
    assert ranks == {0, 1}


def test_merge_folds_leftover_shards_into_the_manifest(model, tmp_path, capsys):
    out = tmp_path / "out"
    run(model, write(tmp_path / "p.txt", PROMPTS[:3]), out)
    records = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text(records[0])
    (out / "manifest.rank-0.jsonl").write_text(records[1])
    (out / "manifest.rank-1.jsonl").write_text(records[2] + records[1])
    assert main(["batch", "--merge", str(out)]) == 0
    assert (out / "manifest.jsonl").read_text() == "".join(records)
    assert not list(out.glob("manifest.rank-*"))


def test_manifest_and_gallery_describe_the_current_prompt_file_and_old_images_are_reported(model, tmp_path, capsys):
    out = tmp_path / "out"
    run(model, write(tmp_path / "p.txt", PROMPTS[:3]), out, num_images=2)
    before = {path.name: path.read_bytes() for path in (out / "images").iterdir()}
    capsys.readouterr()
    fewer = write(tmp_path / "p.txt", [PROMPTS[0], PROMPTS[2]])
    assert run(model, fewer, out, num_images=2).generated == 0
    assert {record["prompt"] for record in manifest_of(out)} == {PROMPTS[0], PROMPTS[2]}
    assert len(manifest_of(out)) == 4
    gallery = (out / "index.html").read_text()
    assert "<p>4 images." in gallery and PROMPTS[1] not in gallery
    assert f"2 image(s) in '{out / 'images'}' belong to no item of '{fewer}'" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in (out / "images").iterdir()} == before  # left as they are
    assert main(["batch", "--merge", str(out)]) == 0
    assert len(manifest_of(out)) == 4 and "2 image(s) in" in capsys.readouterr().err
    assert run(model, write(tmp_path / "p.txt", PROMPTS[:3]), out, num_images=2).generated == 0  # back, recorded
    assert len(manifest_of(out)) == 6 and "image(s) in" not in capsys.readouterr().err


def _lock_held_by(out: Path, pid: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "t2i.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "process_start": None,
                                              "started": "2026-01-01 00:00:00", "command": "t2i batch other"}))


def test_a_second_job_or_merge_into_a_busy_output_folder_is_refused_naming_the_first(model, tmp_path, capsys):
    prompts = write(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "out"
    run(model, prompts, out)
    (out / "images" / sorted(p.name for p in (out / "images").iterdir())[0]).unlink()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_held_by(out, other.pid)
        before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
        assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", "2",
                     "--device", "cpu"]) == 2
        assert f"output folder '{out}' is in use by pid {other.pid}" in capsys.readouterr().err
        assert main(["batch", "--merge", str(out)]) == 2
        assert f"is in use by pid {other.pid}" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before  # nothing made or merged


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launched(command: list[str], ranks: int = 2) -> list[subprocess.Popen]:
    """`command` as the processes of one torchrun-style launch."""
    port = str(_free_port())
    return [subprocess.Popen(command, env=_environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                                                       LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                                                       MASTER_PORT=port, GLOO_SOCKET_IFNAME="lo"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(ranks)]


def test_a_launched_job_or_merge_is_refused_on_every_rank_when_the_output_folder_is_busy(model, tmp_path):
    prompts = write(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "out"
    run(model, prompts, out)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock_held_by(out, other.pid)
        for command in (_saved_command(model, prompts, out), [sys.executable, "-m", "t2i.cli", "batch", "--merge",
                                                               str(out)]):
            ranks = _launched(command)
            outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
            assert [rank.returncode for rank in ranks] == [2, 2], outputs
            assert all(f"output folder '{out}' is in use by pid {other.pid}" in text for text in outputs), outputs
        assert json.loads((out / "t2i.lock").read_text())["pid"] == other.pid  # the holder's lock is left alone
    finally:
        other.kill()


def test_the_main_process_of_a_launched_job_holds_the_output_folder_for_all(model, tmp_path, monkeypatch):
    from t2i.jobs import run as job_run
    from t2i.jobs.processes import Processes

    prompts = write(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "out"
    monkeypatch.setattr(job_run, "current_processes", lambda device: Processes(0, 2, torch.device("cpu"), lambda: None))
    monkeypatch.setattr("accelerate.utils.broadcast_object_list", lambda objects: objects)  # rank 1 agrees
    held_while_generating = []
    generate = job_run._generate

    def generate_and_look(*args, **kwargs):
        held_while_generating.append(json.loads((out / "t2i.lock").read_text())["pid"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(job_run, "_generate", generate_and_look)
    run(model, prompts, out)
    assert held_while_generating == [os.getpid()] and not (out / "t2i.lock").exists()


def test_an_output_folder_that_cannot_be_written_is_one_clear_error(model, tmp_path, capsys, monkeypatch):
    real_write_text = Path.write_text

    def read_only_folder(path, *args, **kwargs):
        if path.parent.name == "out":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only_folder)
    prompts = write(tmp_path / "p.txt", PROMPTS[:2])
    assert main(["batch", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                 "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the lock '{tmp_path / 'out' / 't2i.lock'}' in output folder" in err
    assert "Permission denied; give a folder this user can write to" in err and "Traceback" not in err


def test_the_lock_of_a_killed_job_is_taken_over(model, tmp_path, capsys):
    prompts = write(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "out"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _lock_held_by(out, gone.pid)
    assert run(model, prompts, out).generated == 2
    assert "taking over" in capsys.readouterr().err
    assert not (out / "t2i.lock").exists()


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "other"])
def test_merge_of_what_is_not_a_job_folder_is_one_clear_error(tmp_path, capsys, kind):
    target = tmp_path / kind
    if kind == "file":
        target.write_text("a red circle\n")
    elif kind != "missing":
        target.mkdir()
        if kind == "other":
            (target / "notes.md").write_text("hello\n")
    assert main(["batch", "--merge", str(target)]) == 2
    err = capsys.readouterr().err
    message = {"missing": "does not exist", "file": "is a file; give the --out folder",
               "empty": "is not a batch job's output folder", "other": "is not a batch job's output folder"}[kind]
    assert message in err and "Traceback" not in err
    if target.is_dir():
        assert [path.name for path in target.iterdir()] == (["notes.md"] if kind == "other" else [])  # no lock left
    else:
        assert kind == "file" or not target.exists()


def test_generate_from_image_gives_the_same_pixels(model, tmp_path):
    out = tmp_path / "out"
    run(model, write(tmp_path / "p.jsonl", [{"prompt": "a red circle", "negative_prompt": "blue", "seed": 9,
                                             "sampler": "euler_a", "guidance": 2.25}]), out, batch_size=1)
    original = next((out / "images").glob("*.png"))
    again = tmp_path / "again.png"
    assert main(["generate", "--model", str(model), "--from-image", str(original), "--out", str(again),
                 "--device", "cpu"]) == 0
    assert np.array_equal(np.asarray(Image.open(original)), np.asarray(Image.open(again)))


# ----------------------------------------------------------------- gallery

def test_gallery_loads_every_image_in_headless_chromium(model, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium) to open index.html in")
    out = tmp_path / "out"
    run(model, write(tmp_path / "p.txt", PROMPTS + ["<b>a tag</b> & an ampersand"]), out)
    (out / "images" / "not-there.png").unlink(missing_ok=True)

    def broken_images() -> str:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                              "--disable-component-update", "--disable-sync", "--no-first-run",
                              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                              (out / "index.html").as_uri()], capture_output=True, text=True, timeout=60).stdout
        return dom.split('data-broken-images="', 1)[1].split('"', 1)[0]

    assert broken_images() == "0"
    page = (out / "index.html").read_text()
    assert "&lt;b&gt;a tag&lt;/b&gt; &amp; an ampersand" in page
    assert page.count('loading="lazy"') == page.count("<img") == len(list((out / "images").glob("*.png")))
    next((out / "images").glob("*.png")).unlink()
    assert broken_images() == "1"  # the check itself can fail


def test_items_may_name_the_samplers_written_in_t2i(model, tmp_path):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "a red circle", "id": "pc", "sampler": "pc"},
                                           {"prompt": "a red circle", "id": "ode", "sampler": "pf_ode"}])
    out = tmp_path / "out"
    run(model, prompts, out)
    assert {r["id"]: r["sampler"] for r in manifest_of(out)} == {"pc": "pc", "ode": "pf_ode"}
    text = Image.open(out / "images" / "pc-0.png").info["parameters"]
    assert parse_parameters(text)["sampler"] == "pc"
