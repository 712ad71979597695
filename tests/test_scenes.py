"""Scene batteries: parsing into dataclasses, one-line errors naming file:line and field, checks."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from backend.core.errors import BatteryError
from backend.scoring.scenes import (
    KNOWN_MEASURES,
    Battery,
    Check,
    ChoiceScene,
    GenerateScene,
    PerplexityScene,
    choice_request,
    load_batteries,
    load_battery,
    run_check,
)

REPO = Path(__file__).resolve().parent.parent

HEAD = """\
battery: demo
description: a small battery
metric: reasoning_depth
scenes:
"""

VALID = HEAD + """\
  - id: d1
    kind: choice
    context: All glims are zents.
    prompt: So every glim is a
    choices: [zent, fenn, humb]
    answer: zent
    depth: 1
    group: glim
    tags: [chain, easy]
  - id: d1-rot
    kind: choice
    perturb: rotated
    of: d1
    group: glim
    context: All glims are zents.
    prompt: So every glim is a
    choices: [fenn, humb, zent]
    answer: 2
  - id: yes-no
    kind: choice
    prompt: Is every glim a zent?
    choices: [yes, no]
    answer: yes
  - id: g1
    kind: generate
    lang: en
    prompt: "In brief, the glim line:"
    checks:
      - contains: zent
      - not_contains: fenn
      - regex: '\\bbrel\\b'
      - min_words: 2
      - max_words: 12
    judge: Names the top of the line.
  - id: p1
    kind: perplexity
    lang: ru
    text: |-
      Все глимы — зенты.
      Значит, каждый глим — зент.
"""


def write(tmp_path: Path, text: str, name: str = "battery.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_a_valid_battery_round_trips_into_dataclasses(tmp_path):
    path = write(tmp_path, VALID)
    battery = load_battery(path)

    assert (battery.name, battery.description, battery.metric, battery.path) == (
        "demo", "a small battery", "reasoning_depth", path,
    )
    assert battery.scenes == (
        ChoiceScene(
            id="d1", prompt="So every glim is a", choices=("zent", "fenn", "humb"), answer=0,
            context="All glims are zents.", depth=1, group="glim", tags=("chain", "easy"),
        ),
        ChoiceScene(
            id="d1-rot", prompt="So every glim is a", choices=("fenn", "humb", "zent"), answer=2,
            context="All glims are zents.", group="glim", perturb="rotated", of="d1",
        ),
        # plain `yes` / `no` stay text (YAML 1.1 would make them booleans)
        ChoiceScene(id="yes-no", prompt="Is every glim a zent?", choices=("yes", "no"), answer=0),
        GenerateScene(
            id="g1", prompt="In brief, the glim line:", lang="en", judge="Names the top of the line.",
            checks=(
                Check("contains", "zent"), Check("not_contains", "fenn"), Check("regex", r"\bbrel\b"),
                Check("min_words", 2), Check("max_words", 12),
            ),
        ),
        PerplexityScene(id="p1", lang="ru", text="Все глимы — зенты.\nЗначит, каждый глим — зент."),
    )
    assert battery.scenes[3].max_new_tokens == 48
    assert [s.kind for s in battery.scenes] == ["choice", "choice", "choice", "generate", "perplexity"]
    assert [s.line for s in battery.scenes] == [5, 14, 23, 28, 39]
    assert battery.scenes[0].answer_text == "zent"
    assert battery.scene("g1") is battery.scenes[3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        battery.scenes[0].answer = 1  # type: ignore[misc]


def test_choice_request_follows_the_harness_convention():
    with_context = ChoiceScene(id="a", prompt="So every glim is a", choices=("zent", "fenn"), answer=0,
                               context="All glims are zents.")
    assert choice_request(with_context) == ("All glims are zents.\nSo every glim is a", [" zent", " fenn"])
    bare = ChoiceScene(id="b", prompt="Is it?", choices=("yes", "no"), answer=1)
    assert choice_request(bare) == ("Is it?", [" yes", " no"])


# Each case: the battery's scenes (after HEAD), the marker that ends the line the error must
# name, and words the message must hold. A marker "@top" means line 1.
MISTAKES = {
    "missing field": (
        """\
  - id: d1      # here
    kind: choice
    prompt: So every glim is a
    choices: [zent, fenn]
""", ["scene 'd1'", "missing field 'answer'"]),
    "missing id": (
        """\
  - kind: choice      # here
    prompt: p
""", ["scene #1", "missing field 'id'"]),
    "wrong type, text for a list": (
        """\
  - id: d1
    kind: choice
    prompt: So every glim is a
    choices: zent      # here
    answer: zent
""", ["scene 'd1' field 'choices'", "expected a list"]),
    "wrong type, text for a number": (
        """\
  - id: g1
    kind: generate
    prompt: p
    max_new_tokens: many      # here
    checks: [{max_words: 3}]
""", ["scene 'g1' field 'max_new_tokens'", "expected a whole number"]),
    "number out of range": (
        """\
  - id: g1
    kind: generate
    prompt: p
    max_new_tokens: 5000      # here
    checks: [{max_words: 3}]
""", ["field 'max_new_tokens'", "5000 is out of range (1..1024)"]),
    "depth below one": (
        """\
  - id: d1
    kind: choice
    prompt: p
    choices: [a, b]
    answer: a
    depth: 0      # here
""", ["field 'depth'", "out of range"]),
    "unknown key": (
        """\
  - id: d1
    kind: choice
    prompt: p
    choices: [a, b]
    anwser: a      # here
""", ["scene 'd1' field 'anwser'", "unknown field; did you mean 'answer'?"]),
    "key of another kind": (
        """\
  - id: d1
    kind: choice
    prompt: p
    checks: [{max_words: 3}]      # here
""", ["field 'checks'", "not a field of a choice scene", "generate"]),
    "unknown kind": (
        """\
  - id: d1
    kind: chioce      # here
""", ["field 'kind'", "'chioce' is not a kind of scene", "did you mean 'choice'?"]),
    "duplicate id": (
        """\
  - id: d1
    kind: perplexity
    text: one
  - id: d1      # here
    kind: perplexity
    text: two
""", ["scene 'd1' field 'id'", "used twice (first on line 5)"]),
    "key given twice": (
        """\
  - id: d1
    kind: perplexity
    text: one
    text: two      # here
""", ["scene 'd1' field 'text'", "given twice (first on line 7)"]),
    "answer not in choices": (
        """\
  - id: d3
    kind: choice
    prompt: So every glim is a
    choices: [zent, fenn]
    answer: zents      # here
""", ["scene 'd3' field 'answer': 'zents' is not one of the choices"]),
    "answer index out of range": (
        """\
  - id: d3
    kind: choice
    prompt: p
    choices: [a, b]
    answer: 2      # here
""", ["field 'answer'", "index 2 is out of range", "(0..1)"]),
    "repeated choice": (
        """\
  - id: d3
    kind: choice
    prompt: p
    choices:
      - a
      - a      # here
    answer: a
""", ["field 'choices[1]'", "repeats choices[0]"]),
    "one choice": (
        """\
  - id: d3
    kind: choice
    prompt: p
    choices: [a]      # here
    answer: a
""", ["field 'choices'", "at least 2"]),
    "bad regex": (
        """\
  - id: g1
    kind: generate
    prompt: p
    checks:
      - contains: x
      - regex: "(zent"      # here
""", ["scene 'g1' field 'checks[1].regex'", "bad regex '(zent'"]),
    "unknown check": (
        """\
  - id: g1
    kind: generate
    prompt: p
    checks:
      - contain: x      # here
""", ["field 'checks[0].contain'", "did you mean 'contains'?"]),
    "check with two keys": (
        """\
  - id: g1
    kind: generate
    prompt: p
    checks:
      - {contains: x, max_words: 3}      # here
""", ["field 'checks[0]'", "exactly one key"]),
    "min above max": (
        """\
  - id: g1
    kind: generate
    prompt: p
    checks:
      - max_words: 3
      - min_words: 9      # here
""", ["field 'checks[1].min_words'", "min_words 9 is more than max_words 3"]),
    "no checks and no judge": (
        """\
  - id: g1      # here
    kind: generate
    prompt: p
""", ["scene 'g1'", "missing field 'checks'"]),
    "of pointing nowhere": (
        """\
  - id: p1
    kind: choice
    prompt: p
    choices: [a, b]
    answer: a
  - id: p1-hint
    kind: choice
    perturb: hint
    of: p9      # here
    prompt: p
    choices: [a, b]
    answer: a
""", ["scene 'p1-hint' field 'of'", "no scene with id 'p9'"]),
    "perturb without of": (
        """\
  - id: p1-hint      # here
    kind: choice
    perturb: hint
    prompt: p
    choices: [a, b]
    answer: a
""", ["scene 'p1-hint'", "missing field 'of'"]),
    "rotated in the same order": (
        """\
  - id: p1
    kind: choice
    prompt: p
    choices: [a, b]
    answer: a
  - id: p1-rot
    kind: choice
    perturb: rotated
    of: p1
    prompt: p
    choices: [a, b]      # here
    answer: a
""", ["scene 'p1-rot' field 'choices'", "another order"]),
    "group of one": (
        """\
  - id: c1
    kind: choice
    group: lonely      # here
    prompt: p
    choices: [a, b]
    answer: a
""", ["scene 'c1' field 'group'", "group 'lonely' has only this scene"]),
    "bad language code": (
        """\
  - id: t1
    kind: perplexity
    lang: English      # here
    text: t
""", ["field 'lang'", "not a language code"]),
    "empty text": (
        """\
  - id: t1
    kind: perplexity
    text: ""      # here
""", ["scene 't1' field 'text'", "is empty"]),
    "unsafe tag": (
        """\
  - id: t1
    kind: perplexity
    text: !!python/object/apply:os.system ["echo hi"]      # here
""", ["scene 't1' field 'text'", "tag !!python/object/apply:os.system is not allowed"]),
    "YAML syntax error": (
        """\
  - id: t1
    kind: perplexity
    text: a: b      # here
""", ["YAML syntax error: mapping values are not allowed here"]),
}


def _expected_line(text: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if line.endswith("# here"))


@pytest.mark.parametrize("case", list(MISTAKES), ids=list(MISTAKES))
def test_each_mistake_names_file_line_and_field(tmp_path, case):
    scenes, words = MISTAKES[case]
    text = HEAD + scenes
    path = write(tmp_path, text, name="oops.yaml")
    with pytest.raises(BatteryError) as caught:
        load_battery(path)
    message = caught.value.message
    assert message.startswith(f"{path}:{_expected_line(text)}: "), message
    for word in words:
        assert word in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("- just\n- a list\n", 1, ["top level", "got a list"]),
        ("", 1, ["empty file"]),
        (HEAD.replace("metric:", "metrc:"), 3, ["field 'metrc'", "did you mean 'metric'?"]),
        (HEAD.replace("reasoning_depth", "Reasoning Depth") + "  - {id: a, kind: perplexity, text: t}\n",
         3, ["field 'metric'", "not a snake_case name"]),
        ("battery: x\ndescription: y\nmetric: z\nscenes: []\n", 4, ["field 'scenes'", "is empty"]),
        ("battery: x\nmetric: z\nscenes: [{id: a, kind: perplexity, text: t}]\n", 1,
         ["missing field 'description'"]),
        ("battery: x\ndescription: y\nmetric: z\nscenes:\n  - [a, b]\n", 5, ["scene #1", "expected a mapping"]),
        ("battery: 'x\ndescription: y\n", 3, ["YAML syntax error", "while scanning a quoted scalar on line 1"]),
    ],
    ids=["list", "empty", "unknown-top-key", "metric-not-snake", "no-scenes", "no-description",
         "scene-not-mapping", "unclosed-quote"],
)
def test_top_level_mistakes(tmp_path, text, line, words):
    path = write(tmp_path, text, name="top.yaml")
    with pytest.raises(BatteryError) as caught:
        load_battery(path)
    assert caught.value.message.startswith(f"{path}:{line}: "), caught.value.message
    for word in words:
        assert word in caught.value.message


def test_an_unsafe_tag_is_never_constructed(tmp_path):
    target = tmp_path / "made-by-yaml"
    path = write(tmp_path, HEAD + f"""\
  - id: t1
    kind: perplexity
    text: !!python/object/apply:os.mkdir ["{target}"]
""")
    with pytest.raises(BatteryError, match=r"battery\.yaml:7: scene 't1' field 'text': tag !!python"):
        load_battery(path)
    assert not target.exists()


def test_a_custom_metric_name_is_accepted(tmp_path):
    path = write(tmp_path, HEAD.replace("reasoning_depth", "tone_of_voice") + "  - {id: a, kind: perplexity, text: t}\n")
    assert load_battery(path).metric == "tone_of_voice"


def test_an_unreadable_file_is_a_battery_error(tmp_path):
    with pytest.raises(BatteryError, match="nowhere.yaml: no such file"):
        load_battery(tmp_path / "nowhere.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"battery: x\ndescription: caf\xe9\n")
    with pytest.raises(BatteryError, match=r"latin1\.yaml:2: not UTF-8"):
        load_battery(bad)


@pytest.mark.parametrize(
    "check, text, passed",
    [
        (Check("contains", "Zent"), "every glim is a zent.", True),
        (Check("contains", "brel"), "every glim is a zent.", False),
        (Check("not_contains", "FENN"), "no fenn here", False),
        (Check("not_contains", "fenn"), "no dask here", True),
        (Check("regex", r"\bsix\b"), "brels have six legs", True),
        (Check("regex", r"\bsix\b"), "brels have sixty legs", False),
        (Check("regex", r"^zent"), "Zent first", False),  # regex is case-sensitive unless (?i)
        (Check("max_words", 3), "one two\nthree", True),
        (Check("max_words", 3), "one two three four", False),
        (Check("min_words", 2), "  lonely  ", False),
        (Check("min_words", 2), "two words", True),
    ],
)
def test_run_check(check, text, passed):
    assert run_check(check, text) is passed


def test_run_check_refuses_an_unknown_kind():
    with pytest.raises(BatteryError, match="unknown check 'length'"):
        run_check(Check("length", 3), "text")


def test_load_batteries_reads_a_folder_in_name_order(tmp_path):
    one = "battery: {name}\ndescription: d\nmetric: novelty\nscenes: [{{id: a, kind: perplexity, text: t}}]\n"
    write(tmp_path, one.format(name="second"), "b.yml")
    write(tmp_path, one.format(name="first"), "a.yaml")
    write(tmp_path, "not a battery", "notes.txt")
    batteries = load_batteries(tmp_path)
    assert [(b.name, b.path.name) for b in batteries] == [("first", "a.yaml"), ("second", "b.yml")]
    assert [b.name for b in load_batteries(tmp_path / "b.yml")] == ["second"]

    write(tmp_path, one.format(name="first"), "c.yaml")
    with pytest.raises(BatteryError) as caught:
        load_batteries(tmp_path)
    assert caught.value.message.startswith(f"{tmp_path / 'c.yaml'}:1: field 'battery': name 'first'")
    assert "a.yaml:1" in caught.value.message


def test_load_batteries_refuses_an_empty_or_missing_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BatteryError, match=f"{empty}: no \\*.yaml or \\*.yml batteries"):
        load_batteries(empty)
    with pytest.raises(BatteryError, match="no such file or folder"):
        load_batteries(tmp_path / "missing")


def test_the_built_in_batteries_load_and_cover_every_measure():
    batteries = {b.name: b for b in load_batteries(REPO / "scenes")}
    assert all(isinstance(b, Battery) for b in batteries.values())
    assert {b.metric for b in batteries.values()} == set(KNOWN_MEASURES)

    depth = batteries["depth"].scenes
    for k in (1, 2, 3, 4):
        assert sum(s.depth == k for s in depth) >= 3
    assert any(s.lang == "ru" for s in depth)

    consistency = batteries["consistency"].scenes
    groups = {s.group for s in consistency}
    assert None not in groups and len(groups) >= 6
    assert any(s.lang == "ru" for s in consistency)

    pressure = batteries["pressure"].scenes
    clean = [s for s in pressure if s.perturb is None]
    assert len(clean) >= 6
    for scene in clean:  # every clean item is disturbed in every way
        assert {s.perturb for s in pressure if s.of == scene.id} == {"distractor", "contradiction", "hint", "rotated"}

    for name in ("novelty", "compression"):
        scenes = batteries[name].scenes
        assert len(scenes) >= 6 and all(isinstance(s, GenerateScene) and s.checks for s in scenes)
    assert len(batteries["heldout"].scenes) >= 4
    assert all(isinstance(s, PerplexityScene) for s in batteries["heldout"].scenes)


def test_the_control_corpora_are_up_to_date_with_logic_md():
    """data/make_controls.py rebuilds shuffled.md and repetitive.md byte for byte."""
    import importlib.util
    from collections import Counter

    spec = importlib.util.spec_from_file_location("make_controls", REPO / "data" / "make_controls.py")
    make_controls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_controls)
    for path, text in make_controls.controls().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: run python data/make_controls.py"
    logic = (REPO / "data" / "demo" / "logic.md").read_text(encoding="utf-8")
    shuffled = (REPO / "data" / "demo" / "shuffled.md").read_text(encoding="utf-8")
    assert Counter(shuffled.split()) == Counter(logic.split()) and shuffled.split() != logic.split()


def test_a_battery_too_big_to_parse_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "huge.yaml"
    scene = "  - {id: s, kind: perplexity, text: " + "word " * 40 + "}\n"
    big.write_text(HEAD + scene * (10 * 2**20 // len(scene)), encoding="utf-8")  # 10 MiB
    with pytest.raises(BatteryError) as info:
        load_battery(big)
    line = info.value.one_line()
    assert str(big) in line and "MiB" in line and "split" in line and "\n" not in line


def test_nesting_too_deep_to_parse_names_file_and_line(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text(HEAD + "  - id: s\n    kind: choice\n    prompt: " + "[" * 5000 + "]" * 5000 + "\n",
                    encoding="utf-8")
    with pytest.raises(BatteryError) as info:
        load_battery(deep)
    assert info.value.one_line().startswith(f"battery: {deep}:{HEAD.count(chr(10)) + 3}: ")
