"""Batch inputs: folders, globs, list files, URIs and manifests become one ordered, de-duplicated listing."""

from __future__ import annotations

import json

import pytest

from serve_app.batch.inputs import IMAGE_SUFFIXES, files_listing, find_files, manifest_listing
from serve_app.batch.spec import SpecError, Thresholds, check_image_prompts, global_categories


@pytest.fixture()
def tree(tmp_path):
    for name in ["b.png", "a.jpg", "notes.txt.bak", "sub/c.webp", "sub/deeper/d.PNG", "sub/e.mp4"]:
        path = tmp_path / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path / "photos"


def _names(paths: list[str], root) -> list[str]:
    return [p[len(str(root)) + 1 :] for p in paths]


def test_a_folder_is_walked_sorted_and_filtered_by_suffix(tree):
    assert _names(find_files([str(tree)], IMAGE_SUFFIXES), tree) == ["a.jpg", "b.png", "sub/c.webp", "sub/deeper/d.PNG"]


def test_a_glob_star_stays_in_its_folder_and_double_star_recurses(tree):
    assert _names(find_files([f"{tree}/*.png"], IMAGE_SUFFIXES), tree) == ["b.png"]
    assert _names(find_files([f"{tree}/sub/*"], IMAGE_SUFFIXES), tree) == ["sub/c.webp"]
    assert _names(find_files([f"{tree}/**/*.[pP][nN][gG]"], IMAGE_SUFFIXES), tree) == ["b.png", "sub/deeper/d.PNG"]


def test_a_list_file_keeps_its_order_resolves_relative_paths_and_skips_comments(tree):
    listing = tree / "todo.txt"
    listing.write_text(f"# first the deep one\nsub/deeper/d.PNG\n\n{tree}/a.jpg\nsub/deeper/d.PNG\n")
    assert _names(find_files([str(listing)], IMAGE_SUFFIXES), tree) == ["sub/deeper/d.PNG", "a.jpg"]


def test_file_uris_are_listed_with_their_scheme(tree):
    found = find_files([f"file://{tree}/sub"], IMAGE_SUFFIXES)
    assert found == [f"file://{tree}/sub/c.webp", f"file://{tree}/sub/deeper/d.PNG"]


def test_a_missing_input_or_an_empty_one_is_a_spec_error(tree):
    with pytest.raises(SpecError, match="does not exist"):
        files_listing([str(tree / "nope")], IMAGE_SUFFIXES, ["dog"], None)
    with pytest.raises(SpecError, match="no input files"):
        files_listing([f"{tree}/*.gif"], IMAGE_SUFFIXES, ["dog"], None)


def test_limit_takes_the_first_items_and_keeps_the_full_listing_digest(tree):
    full = files_listing([str(tree)], IMAGE_SUFFIXES, ["dog"], None)
    first = files_listing([str(tree)], IMAGE_SUFFIXES, ["dog"], 2)
    assert first.count == 2 and first.table["index"].to_pylist() == [0, 1]
    assert first.table["path"].to_pylist() == full.table["path"].to_pylist()[:2]
    assert first.digest == full.digest  # so a run with --limit, then one without, is the same run resumed
    with pytest.raises(SpecError, match="at least 1"):
        files_listing([str(tree)], IMAGE_SUFFIXES, ["dog"], 0)


def _check(prompts):
    return check_image_prompts(prompts, Thresholds())


def test_a_manifest_gives_per_image_prompts_and_categories_in_first_seen_order(tmp_path):
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"image": "x.png", "prompts": [{"type": "concept", "text": "dog"}]},
        {"image": "/abs/y.png",
         "prompts": [{"type": "visual", "points": [[1, 2]]}, {"type": "concept", "text": "cat"}]},
        {"image": "x.png", "prompts": [{"type": "concept", "text": "ignored: x.png is listed already"}]},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    found = manifest_listing(str(manifest), "image", _check, None)
    assert found.table["path"].to_pylist() == [str(tmp_path / "x.png"), "/abs/y.png"]
    assert found.categories == ["dog", "prompt-0", "cat"]
    prompts = [json.loads(p) for p in found.table["prompts"].to_pylist()]
    assert prompts[1][0]["points"] == [[1.0, 2.0]] and prompts[1][1]["text"] == "cat"


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "m.jsonl:2: not JSON"),
        ('{"path": "x.png", "prompts": []}', 'm.jsonl:2: expected {"image"'),
        ('{"image": "x.png", "prompts": [{"type": "concept"}]}', "m.jsonl:2: a concept prompt needs text"),
        ('{"image": "x.png", "prompts": [{"type": "visual", "points": [[1]]}]}', "m.jsonl:2: invalid prompts"),
    ],
)
def test_a_bad_manifest_line_is_named(tmp_path, line, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "ok.png", "prompts": [{"type": "concept", "text": "dog"}]}\n' + line + "\n")
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("{", r"\{")):
        manifest_listing(str(manifest), "image", _check, None)


def test_repeated_prompt_names_stay_separate_categories():
    prompts = [{"text": "dog"}, {"text": "cat"}, {"text": "dog"}, {"boxes": [[1, 2, 3, 4]]}]
    assert global_categories(prompts) == ["dog", "cat", "dog #2", "prompt-3"]
