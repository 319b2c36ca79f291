"""Manifest parsing, label checks and the seeded stratified split."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from lightning_wsi.data.manifest import (
    ManifestError,
    parse_target,
    read_manifest,
    stratified_split,
)


def _write(tmp_path, text):
    path = tmp_path / "m.csv"
    path.write_text(text)
    return path


def test_paths_resolve_against_the_manifest_folder(tmp_path):
    path = _write(tmp_path, "slide_id,path,label,mpp\na,slides/a.svs,1,0.25\nb,/abs/b.tiff,0,\n")
    records, bad = read_manifest(path)
    assert bad == []
    assert records[0].path == str(tmp_path / "slides/a.svs") and records[0].mpp == 0.25
    assert records[1].path == "/abs/b.tiff" and records[1].mpp is None


def test_missing_column_names_it_and_what_is_required(tmp_path):
    path = _write(tmp_path, "slide_id,file,label\na,a.svs,1\n")
    with pytest.raises(
        ManifestError, match=r"lacks column\(s\) \['path'\].*has \['slide_id', 'file'"
    ):
        read_manifest(path)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


def test_duplicate_ids_and_bad_rows(tmp_path):
    with pytest.raises(ManifestError, match=r"'a' appears on lines 2 and 3"):
        read_manifest(_write(tmp_path, "slide_id,path,label\na,x.svs,1\na,y.svs,0\n"))
    text = (
        "slide_id,path,label,split,mpp\n"
        "a,a.svs,1,train,\nb,b.svs,0,holdout,\nc,c.svs,0,,-1\n,d.svs,1,,\n"
    )
    records, bad = read_manifest(_write(tmp_path, text))
    assert [r.slide_id for r in records] == ["a"]
    reasons = {b.slide_id: b.reason for b in bad}
    assert "split 'holdout'" in reasons["b"]
    assert "mpp '-1'" in reasons["c"]
    assert "empty slide_id" in reasons["<line 5>"]


def test_labels_per_task():
    assert parse_target("1", "binary") == 1 and parse_target("0.0", "binary") == 0
    with pytest.raises(
        ValueError, match=r"label '2' is not a class of task 'binary'; allowed: \[0, 1\]"
    ):
        parse_target("2", "binary")
    assert parse_target("LUAD", "multiclass", classes=["LUSC", "LUAD"]) == 1
    with pytest.raises(ValueError, match=r"allowed: \['LUSC', 'LUAD'\]"):
        parse_target("SCLC", "multiclass", classes=["LUSC", "LUAD"])
    assert parse_target("4", "multiclass", num_classes=5) == 4
    with pytest.raises(ValueError, match="not a class"):
        parse_target("5", "multiclass", num_classes=5)
    assert parse_target("2.5", "regression") == 2.5
    with pytest.raises(ValueError, match="finite number"):
        parse_target("high", "regression")


def test_stratified_split_keeps_proportions_and_is_seeded():
    targets = [0] * 30 + [1] * 10
    split = stratified_split(targets, seed=0, val_fraction=0.25, test_fraction=0.1)
    by_class = Counter(zip(split, targets, strict=True))
    assert by_class[("val", 0)] == 8 and by_class[("val", 1)] == 2  # round(30 * .25), ... of 10
    assert by_class[("test", 0)] == 3 and by_class[("test", 1)] == 1
    assert split == stratified_split(targets, seed=0, val_fraction=0.25, test_fraction=0.1)
    assert split != stratified_split(targets, seed=1, val_fraction=0.25, test_fraction=0.1)


def test_stratified_split_of_regression_targets_and_tiny_classes():
    split = stratified_split([float(i) for i in range(20)], seed=0, val_fraction=0.2)
    assert split.count("val") == 4
    # a class of one slide stays in train; two slides give one to val
    assert stratified_split([0, 1, 1], seed=0, val_fraction=0.25).count("val") == 1


def test_excel_bom_and_crlf_line_ends(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfslide_id,path,label,mpp\r\na,a.svs,1,0.5\r\nb,b.svs,0,\r\n")
    records, bad = read_manifest(path)
    assert bad == []
    assert [(r.slide_id, r.label, r.mpp, r.row) for r in records] == [
        ("a", "1", 0.5, 2),
        ("b", "0", None, 3),
    ]
    assert records[1].path == str(tmp_path / "b.svs")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("slide_id,path,label\ncafé,é.svs,1\n".encode("latin-1"),
         r"is not UTF-8 text \(byte 0xe9 on line 2\); save it as CSV UTF-8"),
        ("slide_id,path,label\n".encode("utf-16"),
         r"is UTF-16 text, not UTF-8; save it as CSV UTF-8"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
         r"is not text \(it holds NUL bytes: a binary file\?\); give a CSV file"),
    ],
    ids=["latin-1", "utf-16", "binary"],
)  # fmt: skip
def test_a_manifest_that_is_not_utf8_text_is_one_line(tmp_path, content, expected):
    path = tmp_path / "slides.csv"
    path.write_bytes(content)
    with pytest.raises(ManifestError, match=f"^manifest {path} {expected}") as caught:
        read_manifest(path)
    assert "\n" not in str(caught.value)


def test_a_directory_given_as_the_manifest_says_so(tmp_path):
    with pytest.raises(ManifestError, match=f"^manifest {tmp_path} is a directory; give the CSV"):
        read_manifest(tmp_path)


def test_a_huge_header_is_shown_shortened(tmp_path):
    path = _write(tmp_path, ",".join(f"column{i}" for i in range(10_000)) + "\n")
    with pytest.raises(ManifestError, match=r"has \['column0', 'column1', .*\.\.\.\]") as caught:
        read_manifest(path)
    assert len(str(caught.value).replace(str(path), "")) < 250  # not 10,000 names


def test_line_numbers_count_blank_lines_and_mpp_must_be_finite(tmp_path):
    with pytest.raises(ManifestError, match=r"'a' appears on lines 2 and 4"):
        read_manifest(_write(tmp_path, "slide_id,path,label\na,x.svs,1\n\na,y.svs,0\n"))
    records, bad = read_manifest(_write(tmp_path, "slide_id,path,label,mpp\na,x.svs,1,inf\n"))
    assert records == [] and bad[0].reason == "mpp 'inf' is not a positive number"


def test_one_file_under_two_slide_ids_is_a_bad_slide(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "a.svs").write_bytes(b"slide a")
    (slides / "other.svs").write_bytes(b"slide a")  # same bytes, another file: a slide of its own
    (slides / "link.svs").symlink_to(slides / "a.svs")
    os.link(slides / "a.svs", slides / "hard.svs")
    text = (
        "slide_id,path,label\n"
        "a,slides/a.svs,1\n"
        "other,slides/other.svs,0\n"
        "dotted,slides/../slides/a.svs,0\n"
        f"link,{slides / 'link.svs'},1\n"
        "hard,slides/hard.svs,1\n"
        "gone,slides/missing.svs,0\n"
        "gone_again,slides/./missing.svs,1\n"
    )
    records, bad = read_manifest(_write(tmp_path, text))
    assert [r.slide_id for r in records] == ["a", "other", "gone"]
    assert [(b.slide_id, b.reason) for b in bad] == [
        ("dotted", "same file as slide 'a' (line 2); one file must be one slide"),
        ("link", "same file as slide 'a' (line 2); one file must be one slide"),
        ("hard", "same file as slide 'a' (line 2); one file must be one slide"),
        ("gone_again", "same file as slide 'gone' (line 7); one file must be one slide"),
    ]
    assert bad[0].path == str(tmp_path / "slides/../slides/a.svs")
