"""User data sources through `build_datasets`: what is kept, what is quarantined and why, and determinism."""
import json
from dataclasses import replace

import pytest
import torch

from t2i.config import DataConfig, load_config
from t2i.data.build import build_datasets
from t2i.errors import ConfigError, T2IError

from conftest import REPO
from data_fixtures import clean_folder, good_images, image_bytes, planted_folder


def data_config(path, **options) -> DataConfig:
    return DataConfig(dataset="imagefolder", path=str(path), **options)


def quarantined(run_dir) -> dict[str, str]:
    lines = (run_dir / "quarantine.jsonl").read_text().splitlines()
    return {record["file"]: record["reason"] for record in map(json.loads, lines)}


def quarantine_details(run_dir) -> dict[str, str]:
    lines = (run_dir / "quarantine.jsonl").read_text().splitlines()
    return {record["file"]: record.get("detail", "") for record in map(json.loads, lines)}


@pytest.mark.parametrize("layout", ["metadata", "sidecar"])
def test_quarantine_lists_exactly_the_planted_bad_files(tmp_path, capsys, layout):
    folder = planted_folder(tmp_path, layout)
    train, validation, report = build_datasets(data_config(folder.root, max_bad_fraction=1.0), tmp_path / "run")
    assert quarantined(tmp_path / "run") == folder.bad
    assert {sample.name: sample.caption for sample in train.samples} == folder.good
    assert validation is None
    assert report.kept == len(folder.good) and sum(report.skipped.values()) == len(folder.bad)
    assert report.skipped["truncated image"] == 2
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"data: {len(folder.good)} images, {len(folder.bad)} skipped (")
    assert "truncated image: 2" in line and "quarantine.jsonl" in line


def test_items_look_like_shapes_items(tmp_path):
    folder = clean_folder(tmp_path, count=4)
    train, _, _ = build_datasets(data_config(folder.root, resolution=16))
    item = train[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert item["caption"] == folder.good[train.samples[0].name]


@pytest.mark.parametrize("metadata", ["jsonl", "csv", "sidecar"])
def test_each_caption_layout_reads_every_image(tmp_path, metadata):
    folder = clean_folder(tmp_path, count=6, metadata=metadata, caption_column="caption")
    options = {} if metadata == "sidecar" else {"caption_column": "caption"}
    train, _, report = build_datasets(data_config(folder.root, **options), tmp_path / "run")
    assert {s.name: s.caption for s in train.samples} == folder.good
    assert report.skipped == {} and not (tmp_path / "run" / "quarantine.jsonl").exists()
    assert [s.name for s in train.samples] == sorted(folder.good)


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_images_the_metadata_leaves_out_are_counted_and_named_but_not_bad(tmp_path, capsys, metadata):
    folder = clean_folder(tmp_path, count=6, metadata=metadata)
    unlisted = good_images(folder.root, count=5, prefix="unlisted")
    train, _, report = build_datasets(data_config(folder.root), tmp_path / "run")  # 5 of 11 left out: no error
    assert {sample.name for sample in train.samples} == set(folder.good)
    assert report.skipped == {"not in metadata": 5}
    assert quarantined(tmp_path / "run") == dict.fromkeys(unlisted, "not in metadata")
    assert capsys.readouterr().out.splitlines() == [
        f"data: 6 images, 5 skipped (not in metadata: 5); see {tmp_path / 'run' / 'quarantine.jsonl'}",
        "data: 5 images in the folder are not in its metadata file and were left out: unlisted_000.png, "
        "unlisted_001.png, unlisted_002.jpg and 2 more"]
    (folder.root / f"metadata.{metadata}").write_text("file_name,text\n" if metadata == "csv" else "")
    with pytest.raises(T2IError, match="every entry was skipped .*; nothing is left to train on"):
        build_datasets(data_config(folder.root), tmp_path / "run")


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_a_repeated_row_is_a_duplicate_and_another_caption_of_a_file_is_a_sample_of_its_own(tmp_path, capsys,
                                                                                           metadata):
    folder = clean_folder(tmp_path, count=4, metadata=metadata)
    first, second = sorted(folder.good)[:2]
    rows = [(first, folder.good[first]), (second, "the same picture, told again"),
            (second, "and a third time")]
    with (folder.root / f"metadata.{metadata}").open("a") as file:
        file.writelines(json.dumps({"file_name": name, "text": text}) + "\n" if metadata == "jsonl"
                        else f'{name},"{text}"\n' for name, text in rows)
    train, validation, report = build_datasets(data_config(folder.root, validation_fraction=0.25, max_bad_fraction=0.5),
                                               tmp_path / "run")
    samples = train.samples + validation.samples
    assert sorted((sample.name, sample.caption) for sample in samples) == sorted(
        [*folder.good.items(), *rows[1:]])
    assert report.skipped == {"duplicate metadata row": 1}
    header = 1 if metadata == "csv" else 0
    assert quarantine_details(tmp_path / "run") == {
        f"metadata.{metadata}:{5 + header}": f"{first} with the same caption is already on line {1 + header}"}
    assert report.summary().startswith("data: 6 samples from 4 images, 1 skipped (duplicate metadata row: 1)")
    assert "data: 1 image has 3 captions; each caption is a sample of its own" in capsys.readouterr().out
    assert {sample.name for sample in validation.samples}.isdisjoint(sample.name for sample in train.samples)


def test_a_sidecar_caption_pairs_with_any_image_pil_reads_and_else_is_named(tmp_path, capsys):
    folder = clean_folder(tmp_path, count=3, metadata="sidecar")
    for name, fmt in (("scan.jfif", "JPEG"), ("render.tga", "TGA"), ("uncaptioned.tga", "TGA")):
        (folder.root / name).write_bytes(image_bytes((40, 40), 7, fmt))
    captions = {"scan.txt": "a jfif picture", "render.txt": "a targa picture", "photo.txt": "renamed to .jpg.bak",
                "notes.txt": "beside no file"}
    for name, caption in captions.items():
        (folder.root / name).write_text(caption)
    (folder.root / "photo.jpg.bak").write_bytes(image_bytes((40, 40), 8, "JPEG"))
    train, _, report = build_datasets(data_config(folder.root), tmp_path / "run")  # left out, not bad: no error
    assert {sample.name: sample.caption for sample in train.samples} == {
        **folder.good, "scan.jfif": "a jfif picture", "render.tga": "a targa picture"}
    assert report.skipped == {"caption without image": 2}
    assert quarantine_details(tmp_path / "run") == {"notes.txt": "no file of its name beside it",
                                                    "photo.txt": "beside it: photo.jpg.bak, not an image t2i reads"}
    assert capsys.readouterr().out.splitlines()[-1] == (
        "data: 2 caption files have no image beside them that t2i reads and were left out: notes.txt, photo.txt")


def test_a_csv_row_of_another_width_is_skipped_and_an_open_quote_or_no_header_stops(tmp_path):
    folder = clean_folder(tmp_path, count=4, metadata="csv")
    first, second, third, fourth = sorted(folder.good)
    metadata = folder.root / "metadata.csv"
    metadata.write_text(f'file_name,text\n{first},a caption, unquoted\n{second}\n{third},"quoted, as it should be"\n'
                        f'{fourth},"a caption\nover two lines"\n')
    train, _, _ = build_datasets(data_config(folder.root, max_bad_fraction=0.5), tmp_path / "run")
    assert {sample.name: sample.caption for sample in train.samples} == {
        third: "quoted, as it should be", fourth: "a caption\nover two lines"}
    advice = "put a caption that holds a comma in double quotes"
    assert quarantine_details(tmp_path / "run") == {"metadata.csv:2": f"3 cells where the header has 2; {advice}",
                                                    "metadata.csv:3": f"1 cell where the header has 2; {advice}"}
    metadata.write_text(f'file_name,text\n{first},plain\n{second},"a quote left open\n{third},plain\n')
    with pytest.raises(T2IError, match="metadata.csv' line 3: a quoted cell is not closed where it should be"):
        build_datasets(data_config(folder.root))
    metadata.write_text(f'file_name,text\n{first},"a quote left open\n{second},plain\n{third},closed here"\n')
    with pytest.raises(T2IError, match=f"metadata.csv' line 2: a quoted cell runs on into the row '{second},plain'"):
        build_datasets(data_config(folder.root))
    metadata.write_text(f"{first},a caption\n{second},another\n")
    with pytest.raises(T2IError, match=f"has no header row: its first row, '{first},a caption', must name the "
                                       "columns, as 'file_name,text' does"):
        build_datasets(data_config(folder.root))


def test_structural_problems_stop_with_one_line(tmp_path):
    folder = clean_folder(tmp_path, count=3, metadata="csv")
    with pytest.raises(T2IError, match="has no 'caption' column \\(it has file_name, text\\)"):
        build_datasets(data_config(folder.root, caption_column="caption"))
    (folder.root / "metadata.jsonl").write_text("")
    with pytest.raises(T2IError, match="holds both metadata.jsonl and metadata.csv"):
        build_datasets(data_config(folder.root))
    with pytest.raises(T2IError, match="is not a folder"):
        build_datasets(data_config(tmp_path / "nowhere"))


def test_too_many_bad_files_stop_the_run_after_writing_the_quarantine(tmp_path):
    folder = planted_folder(tmp_path)
    with pytest.raises(T2IError, match=r"14 of 34 entries are bad .*more than data.max_bad_fraction = 0.05"):
        build_datasets(data_config(folder.root), tmp_path / "run")
    assert quarantined(tmp_path / "run") == folder.bad
    build_datasets(data_config(folder.root, max_bad_fraction=0.45))


def test_each_scan_rewrites_the_quarantine_whole(tmp_path):
    """A run stopped by bad files, then rerun (as with --resume) after they are fixed, lists only what is still bad."""
    folder = clean_folder(tmp_path, count=6, metadata="sidecar")
    for name in ("bad_1.png", "bad_2.png"):
        (folder.root / name).write_text("not an image")
        (folder.root / name).with_suffix(".txt").write_text("a caption")
    with pytest.raises(T2IError, match="2 of 8 entries are bad"):
        build_datasets(data_config(folder.root), tmp_path / "run")
    assert quarantined(tmp_path / "run") == {"bad_1.png": "not an image", "bad_2.png": "not an image"}
    for path in folder.root.glob("bad_1.*"):
        path.unlink()
    build_datasets(data_config(folder.root, max_bad_fraction=0.5), tmp_path / "run")
    assert quarantined(tmp_path / "run") == {"bad_2.png": "not an image"}
    for path in folder.root.glob("bad_2.*"):
        path.unlink()
    _, _, report = build_datasets(data_config(folder.root), tmp_path / "run")
    assert report.skipped == {} and not (tmp_path / "run" / "quarantine.jsonl").exists()


def test_every_rank_keeps_the_same_entries_and_only_the_main_one_writes(tmp_path):
    folder = planted_folder(tmp_path)
    config = data_config(folder.root, max_bad_fraction=1.0)
    main, _, main_report = build_datasets(config, tmp_path / "run")
    other, _, other_report = build_datasets(config, tmp_path / "run", main_process=False)
    assert [s.name for s in main.samples] == [s.name for s in other.samples]
    assert main_report.skipped == other_report.skipped
    assert len((tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()) == len(folder.bad)


def test_two_builds_give_the_same_pixels_crops_and_flips(tmp_path):
    folder = clean_folder(tmp_path, count=6)
    config = data_config(folder.root, resolution=24, crop="random", random_flip=True, seed=3)
    first, _, _ = build_datasets(config)
    second, _, _ = build_datasets(config)
    for key in [0, 5, (2, 0), (2, 7)]:
        assert torch.equal(first[key]["pixel_values"], second[key]["pixel_values"])
    across_epochs = {first[(4, epoch)]["pixel_values"].numpy().tobytes() for epoch in range(8)}
    assert len(across_epochs) > 1  # augmentation changes with the epoch
    reseeded, _, _ = build_datasets(replace(config, seed=4))
    assert not all(torch.equal(first[(i, 0)]["pixel_values"], reseeded[(i, 0)]["pixel_values"]) for i in range(6))


def test_validation_split_is_stable_and_disjoint(tmp_path):
    folder = clean_folder(tmp_path, count=20)
    train, validation, report = build_datasets(data_config(folder.root, validation_fraction=0.2))
    assert "data: 4 of them held out for validation (data.validation_fraction 0.2), 16 to train on" in report.notes
    train_names = {s.name for s in train.samples}
    validation_names = {s.name for s in validation.samples}
    assert len(validation_names) == 4 and not train_names & validation_names
    assert train_names | validation_names == set(folder.good)
    again, validation_again, _ = build_datasets(data_config(folder.root, validation_fraction=0.2, seed=9))
    assert {s.name for s in validation_again.samples} == validation_names
    assert validation[0]["pixel_values"].shape == (3, 32, 32)


def test_a_set_too_small_for_its_validation_fraction_holds_nothing_out_and_says_so(tmp_path):
    folder = clean_folder(tmp_path, count=5)  # 5% of 5 images: one held out was 20% of the user's data
    train, validation, report = build_datasets(data_config(folder.root, validation_fraction=0.05))
    assert validation is None and len(train.samples) == 5
    assert ("data: data.validation_fraction 0.05 of 5 samples holds none out, so all train and no validation loss is "
            "scored; raise it to hold some out") in report.notes
    train, validation, _ = build_datasets(data_config(folder.root, validation_fraction=0.2))
    assert len(validation.samples) == 1 and len(train.samples) == 4


def test_config_keys(tmp_path):
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.data.dataset == "shapes" and demo.data.path is None and not demo.data.buckets.enabled
    config = load_config(REPO / "configs" / "tiny.yaml", [
        "data.dataset=imagefolder", f"data.path={tmp_path}", "data.resolution=48", "data.crop=random",
        "data.buckets.enabled=true", "data.validation_fraction=0.1"])
    assert config.data.resolution == 48 and config.data.buckets.enabled and config.data.smallest_image_side == 24
    with pytest.raises(ConfigError, match="data.dataset 'imagefolder' needs data.path"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.dataset=imagefolder"])
    with pytest.raises(ConfigError, match="data.resolution must be a positive multiple of 8"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.dataset=imagefolder", "data.path=x", "data.resolution=50"])
    with pytest.raises(ConfigError, match="'data.crop' must be one of 'center', 'random'"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.crop=left"])
    with pytest.raises(ConfigError, match="data.max_bad_fraction must lie in"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.max_bad_fraction=2"])
    with pytest.raises(ConfigError, match="unknown config key 'data.buckets.enable'"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.buckets.enable=true"])


def test_shapes_come_through_the_same_entry_point():
    train, validation, report = build_datasets(DataConfig(size=8))
    assert len(train) == 8 and validation is None and report.kept == 8
    assert train[0]["pixel_values"].shape == (3, 32, 32)


def test_a_datasets_folder_with_its_own_column_names(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # load_dataset caches here
    folder = clean_folder(tmp_path, count=5)
    names = sorted(folder.good)
    pictures = [{"bytes": (folder.root / name).read_bytes(), "path": None} for name in names]
    pictures[1] = {"bytes": b"", "path": None}
    captions = [folder.good[name] for name in names]
    captions[3] = None
    table = datasets.Dataset.from_dict({"picture": pictures, "words": captions},
                                       features=datasets.Features({"picture": datasets.Image(),
                                                                   "words": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "saved"))
    config = DataConfig(dataset="datasets", path=str(tmp_path / "saved"), image_column="picture",
                        caption_column="words", max_bad_fraction=0.5)
    train, _, report = build_datasets(config, tmp_path / "run")
    assert quarantined(tmp_path / "run") == {"train[1]": "zero-byte file", "train[3]": "missing caption"}
    assert [s.caption for s in train.samples] == [captions[i] for i in (0, 2, 4)]
    assert train[1]["pixel_values"].shape == (3, 32, 32)
    table.to_parquet(str(tmp_path / "table.parquet"))
    from_file, _, _ = build_datasets(replace(config, path=str(tmp_path / "table.parquet")))
    assert torch.equal(from_file[2]["pixel_values"], train[2]["pixel_values"])
    with pytest.raises(T2IError, match="has no column 'image'"):
        build_datasets(replace(config, image_column="image"))


def test_a_table_of_image_paths_reads_the_files_relative_to_its_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    folder = clean_folder(tmp_path, count=4)
    names = sorted(folder.good)
    paths = [names[0], str(folder.root / names[1]), "gone.png", "https://example.com/x.png"]
    rows = [f'{path},"{folder.good[name]}"' for path, name in zip(paths, names)]
    (folder.root / "table.csv").write_text("\n".join(["image,text", *rows]) + "\n")
    monkeypatch.chdir(tmp_path)  # relative paths are the table's folder's, not the working folder's
    config = DataConfig(dataset="datasets", path=str(folder.root / "table.csv"), max_bad_fraction=1.0)
    train, _, _ = build_datasets(config, tmp_path / "run")
    assert [s.caption for s in train.samples] == [folder.good[name] for name in names[:2]]
    assert train[0]["pixel_values"].shape == (3, 32, 32)
    assert quarantined(tmp_path / "run") == {"train[2]": "missing file", "train[3]": "not an image"}
    assert quarantine_details(tmp_path / "run")["train[2]"] == f"no file '{folder.root / 'gone.png'}'"


@pytest.mark.parametrize("metadata", ["sidecar", "jsonl"])
def test_a_run_folder_inside_the_image_folder_is_not_read_as_data(tmp_path, metadata):
    """`t2i finetune --data . --out runs/mine` from inside the image folder: the run's sample grids are no images to
    train on, nor bad or unlisted ones, when the run resumes."""
    folder = clean_folder(tmp_path, count=4, metadata=metadata)
    run_dir = folder.root / "runs" / "mine"
    (run_dir / "finetune" / "samples").mkdir(parents=True)
    (run_dir / "finetune" / "samples" / "step_0000002.png").write_bytes(image_bytes((64, 32), seed=9))
    train, _, report = build_datasets(DataConfig(dataset="imagefolder", path=str(folder.root)), run_dir)
    assert sorted(s.name for s in train.samples) == sorted(folder.good)
    assert report.skipped == {} and report.notes == []
    assert not (run_dir / "quarantine.jsonl").exists()


@pytest.mark.parametrize("metadata", ["sidecar", "jsonl"])
def test_another_run_folder_inside_the_image_folder_is_left_out_and_named(tmp_path, metadata):
    """`--data . --out runs/a`, then `--data . --out runs/b`: runs/a's sample grids counted as missing-caption
    images (or unlisted ones) and could stop runs/b over data.max_bad_fraction."""
    folder = clean_folder(tmp_path, count=4, metadata=metadata)
    earlier = folder.root / "runs" / "a"
    (earlier / "finetune" / "samples").mkdir(parents=True)
    (earlier / "config.yaml").write_text("stages: [finetune]\n")
    (earlier / "finetune" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (earlier / "finetune" / "samples" / "step_0000002.png").write_bytes(image_bytes((64, 32), seed=9))
    (folder.root / "album").mkdir()  # a folder with a config.yaml of its own but no run in it is read as data
    (folder.root / "album" / "config.yaml").write_text("camera: x\n")
    train, _, report = build_datasets(DataConfig(dataset="imagefolder", path=str(folder.root)),
                                      folder.root / "runs" / "b")
    assert sorted(s.name for s in train.samples) == sorted(folder.good)
    assert report.skipped == {"t2i run folder": 1} and report.bad == 0
    assert "data: 1 folder is a t2i run's output (its sample grids are not training images) and was left out: " \
           "runs/a/" in report.notes


def test_an_image_folders_metadata_file_given_as_the_data_says_to_give_its_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    folder = clean_folder(tmp_path, count=2)
    with pytest.raises(T2IError, match=f"is an image folder's metadata file: give its folder \\('{folder.root}'\\)"):
        build_datasets(DataConfig(dataset="datasets", path=str(folder.root / "metadata.jsonl")))


def test_an_empty_image_cell_is_a_missing_image(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    pictures = [{"bytes": image_bytes((40, 40), seed=0), "path": None}, None]
    table = datasets.Dataset.from_dict({"image": pictures, "text": ["a picture", "no picture"]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "text": datasets.Value("string")}))
    table.to_parquet(str(tmp_path / "table.parquet"))
    config = DataConfig(dataset="datasets", path=str(tmp_path / "table.parquet"), max_bad_fraction=1.0)
    train, _, _ = build_datasets(config, tmp_path / "run")
    assert [s.caption for s in train.samples] == ["a picture"]
    assert quarantined(tmp_path / "run") == {"train[1]": "missing image"}
    assert quarantine_details(tmp_path / "run") == {"train[1]": "column 'image' is empty in this row"}


def test_a_table_row_with_a_list_of_captions_gives_a_sample_a_caption(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = clean_folder(tmp_path, count=3)
    names = sorted(folder.good)
    captions = [["a red one", "a crimson one"], ["a blue one"], []]
    table = datasets.Dataset.from_dict({"image": [str(folder.root / name) for name in names], "text": captions})
    table.save_to_disk(str(tmp_path / "saved"))
    config = DataConfig(dataset="datasets", path=str(tmp_path / "saved"), max_bad_fraction=1.0)
    train, _, report = build_datasets(config, tmp_path / "run")
    assert [(s.name, s.caption) for s in train.samples] == [
        ("train[0]", "a red one"), ("train[0]", "a crimson one"), ("train[1]", "a blue one")]
    assert quarantined(tmp_path / "run") == {"train[2]": "missing caption"}
    assert any("1 image has 2 captions" in note for note in report.notes)


def test_an_empty_or_rowless_table_file_is_said_plainly(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    empty = datasets.Dataset.from_dict({"image": [], "text": []},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "text": datasets.Value("string")}))
    empty.to_parquet(str(tmp_path / "rowless.parquet"))
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "rowless.parquet").read_bytes()[:40])
    (tmp_path / "header.csv").write_text("image,text\n\n")
    empty.save_to_disk(str(tmp_path / "saved"))
    for name, message in [("rowless.parquet", "holds no rows"), ("empty.parquet", "is an empty file"),
                          ("cut.parquet", "is not a readable parquet file"), ("header.csv", "a header and no rows"),
                          ("saved", "holds no rows")]:
        with pytest.raises(T2IError, match=message):
            build_datasets(DataConfig(dataset="datasets", path=str(tmp_path / name)))


def test_a_quarantine_cut_short_by_a_kill_is_read_back(tmp_path):
    from t2i.data.quarantine import Quarantine

    path = tmp_path / "quarantine.jsonl"
    path.write_text('{"file": "a.png", "reason": "zero-byte file"}\n{"file": "b.png", "rea')
    quarantine = Quarantine(path)
    quarantine.add("a.png", "zero-byte file")
    quarantine.add("b.png", "truncated image")
    lines = path.read_text().splitlines()
    assert lines.count('{"file": "a.png", "reason": "zero-byte file"}') == 1  # not written twice
    assert '{"file": "b.png", "reason": "truncated image"}' in lines
