"""Scene batteries: YAML files of test scenes, parsed into frozen dataclasses and validated on load.

A battery feeds one measure (``metric``) and holds scenes of three kinds: ``choice`` (scored by
log-likelihood, lm-evaluation-harness style), ``generate`` (a completion checked by simple rules
and optionally a judge rubric) and ``perplexity`` (loss on held-out text). The schema is in
docs/scenes.md. Every error names the file, the 1-based line and the field, in one line:

    scenes/depth.yaml:14: scene 'd3' field 'answer': 'zents' is not one of the choices

The YAML is composed (not constructed) with ``yaml.SafeLoader``: the node tree keeps every line
number, and we build values ourselves, so no tag outside plain YAML can run or even be built.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from backend.core.errors import BatteryError

KNOWN_MEASURES = ("reasoning_depth", "consistency", "pressure", "novelty", "compression", "perplexity")
KINDS = ("choice", "generate", "perplexity")
PERTURBATIONS = ("distractor", "contradiction", "hint", "rotated")
CHECK_KINDS = ("contains", "not_contains", "regex", "max_words", "min_words")
DEFAULT_MAX_NEW_TOKENS = 48
MAX_NEW_TOKENS_LIMIT = 1024

_TOP_KEYS = ("battery", "description", "metric", "scenes")
_COMMON_KEYS = ("id", "kind", "lang", "tags")
_KIND_KEYS = {
    "choice": ("context", "prompt", "choices", "answer", "depth", "group", "perturb", "of"),
    "generate": ("prompt", "max_new_tokens", "checks", "judge", "group"),
    "perplexity": ("text",),
}

_METRIC_RE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_LANG_RE = re.compile(r"[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*")

_YAML = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_YAML + t for t in ("str", "int", "float", "bool", "null"))
_TIMESTAMP, _MAP, _SEQ = (_YAML + t for t in ("timestamp", "map", "seq"))
# Plain YAML only. Anything else (!!python/..., !!binary, !!set, custom !tags) is refused.
_SAFE_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _NULL, _TIMESTAMP, _MAP, _SEQ})


@dataclass(frozen=True)
class Check:
    """One rule a generated completion must pass: contains, not_contains, regex, max_words, min_words."""

    kind: str
    value: Union[str, int]


@dataclass(frozen=True)
class ChoiceScene:
    """Pick the answer among ``choices`` by log-likelihood; ``answer`` is an index into choices."""

    id: str
    prompt: str
    choices: tuple[str, ...]
    answer: int
    context: str | None = None
    depth: int | None = None
    group: str | None = None
    perturb: str | None = None
    of: str | None = None
    lang: str | None = None
    tags: tuple[str, ...] = ()
    line: int = field(default=0, compare=False)
    kind: str = field(default="choice", init=False)

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer]


@dataclass(frozen=True)
class GenerateScene:
    """Complete ``prompt``; the completion must pass every check (and is shown to a judge if set)."""

    id: str
    prompt: str
    checks: tuple[Check, ...]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    judge: str | None = None
    group: str | None = None
    lang: str | None = None
    tags: tuple[str, ...] = ()
    line: int = field(default=0, compare=False)
    kind: str = field(default="generate", init=False)


@dataclass(frozen=True)
class PerplexityScene:
    """Per-token loss on ``text``, which should be held out from every corpus."""

    id: str
    text: str
    lang: str | None = None
    tags: tuple[str, ...] = ()
    line: int = field(default=0, compare=False)
    kind: str = field(default="perplexity", init=False)


Scene = Union[ChoiceScene, GenerateScene, PerplexityScene]


@dataclass(frozen=True)
class Battery:
    """One YAML file: a named set of scenes feeding one measure."""

    name: str
    description: str
    metric: str
    scenes: tuple[Scene, ...]
    path: Path
    line: int = field(default=1, compare=False)  # where `battery:` is, for cross-file errors

    def scene(self, scene_id: str) -> Scene:
        for scene in self.scenes:
            if scene.id == scene_id:
                return scene
        raise KeyError(scene_id)


def choice_request(scene: ChoiceScene) -> tuple[str, list[str]]:
    """The log-likelihood request for a choice scene, in lm-evaluation-harness's convention.

    Context is ``context + "\\n" + prompt`` (just the prompt without a context); each
    continuation is ``" " + choice`` (target_delimiter " "), so acc and acc_norm agree with the
    harness when the same scene is written as a harness task.
    """
    context = f"{scene.context}\n{scene.prompt}" if scene.context else scene.prompt
    return context, [" " + choice for choice in scene.choices]


def run_check(check: Check, text: str) -> bool:
    """Whether ``text`` (the completion, without the prompt) passes one check."""
    if check.kind == "contains":
        return str(check.value).casefold() in text.casefold()
    if check.kind == "not_contains":
        return str(check.value).casefold() not in text.casefold()
    if check.kind == "regex":
        return re.search(str(check.value), text) is not None
    if check.kind == "max_words":
        return len(text.split()) <= int(check.value)
    if check.kind == "min_words":
        return len(text.split()) >= int(check.value)
    raise BatteryError(f"unknown check {check.kind!r} (checks: {', '.join(CHECK_KINDS)})")


# A battery of ten thousand scenes is about 3 MB. Past this a file is refused before it is read:
# the YAML parser holds some twenty times a file's size while it works.
MAX_BATTERY_BYTES = 8 << 20


def load_battery(path: str | Path) -> Battery:
    """Read, parse and validate one battery file; raise BatteryError naming file:line and field."""
    path = Path(path)
    name = str(path)  # as the user wrote it, so the message points where they look
    try:
        size = path.stat().st_size
        if size > MAX_BATTERY_BYTES and path.is_file():
            raise BatteryError(
                f"{name}: {size / 2**20:.1f} MiB; a battery is at most {MAX_BATTERY_BYTES >> 20} MiB: "
                "split its scenes into several files in one folder"
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BatteryError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise BatteryError(f"{name}: is a folder; load_batteries reads a folder") from None
    except OSError as exc:
        raise BatteryError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BatteryError(f"{name}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x})") from None
    try:
        return _Reader(name).battery(_compose(name, text), path)
    except RecursionError:
        raise BatteryError(
            f"{name}:{_deep_line(text)}: lists or mappings nested too deeply to read; "
            "a scene needs a few levels"
        ) from None


def _deep_line(text: str, depth: int = 50) -> int:
    """The line where flow brackets first nest `depth` deep (where a nesting bomb starts), else 1."""
    level = 0
    for i, ch in enumerate(text):
        level += ch in "[{"
        level -= ch in "]}"
        if level >= depth:
            return text.count("\n", 0, i) + 1
    return 1


def load_batteries(path: str | Path) -> list[Battery]:
    """A battery file, or every *.yaml / *.yml in a folder (sorted by name); names must be unique."""
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir()
            if p.suffix in (".yaml", ".yml") and p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise BatteryError(f"{path}: no *.yaml or *.yml batteries in this folder")
    elif path.exists():
        files = [path]
    else:
        raise BatteryError(f"{path}: no such file or folder")
    batteries = [load_battery(f) for f in files]
    first: dict[str, Battery] = {}
    for battery in batteries:
        other = first.setdefault(battery.name, battery)
        if other is not battery:
            raise BatteryError(
                f"{battery.path}:{battery.line}: field 'battery': name '{battery.name}' "
                f"is already used by {other.path}:{other.line}"
            )
    return batteries


def _compose(name: str, text: str) -> Node:
    """The YAML node tree (SafeLoader, nothing constructed); syntax errors become one line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = " ".join(str(exc.problem or "cannot parse").split())
        where = ""
        if exc.context and exc.context_mark and exc.context_mark.line + 1 != line:
            where = f" ({exc.context} on line {exc.context_mark.line + 1})"
        raise BatteryError(f"{name}:{line}: YAML syntax error: {problem}{where}") from None
    except yaml.YAMLError as exc:  # ReaderError: a character YAML does not allow
        position = getattr(exc, "position", 0) or 0
        line = text[:position].count("\n") + 1
        reason = " ".join(str(getattr(exc, "reason", exc)).split())
        raise BatteryError(f"{name}:{line}: YAML cannot read this text: {reason}") from None
    if root is None:
        raise BatteryError(
            f"{name}:1: empty file; a battery is a mapping with {', '.join(_TOP_KEYS)}"
        )
    return root


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_YAML):] if tag.startswith(_YAML) else tag


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "nothing"
    if node.tag == _STR:
        return repr(node.value)
    return node.value


def _suggest(word: str, options: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _field(where: str, key: str) -> str:
    return f"{where} field '{key}'" if where else f"field '{key}'"


class _Mapping:
    """A mapping node as key → (key node, value node), refusing duplicate and non-text keys."""

    def __init__(self, reader: _Reader, node: MappingNode, where: str) -> None:
        self.node = node
        self.where = where
        self.items: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag not in (_STR, _INT, _BOOL, _FLOAT):
                if key_node.tag == _YAML + "merge":
                    raise reader.fail(key_node, where, "merge keys (<<) are not supported; write the fields out")
                raise reader.fail(key_node, where, f"a field name must be plain text, got {_describe(key_node)}")
            key = key_node.value
            if key in self.items:
                first = _line(self.items[key][0])
                raise reader.fail(key_node, _field(where, key), f"given twice (first on line {first})")
            self.items[key] = (key_node, value_node)

    def get(self, key: str) -> Node | None:
        item = self.items.get(key)
        return item[1] if item else None


class _Reader:
    """Builds checked values from nodes; every failure names file:line and the field."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._scalars = SafeConstructor()  # only its int constructor is used, on int-tagged nodes

    def fail(self, node: Node, where: str, message: str) -> BatteryError:
        prefix = f"{self.name}:{_line(node)}: "
        return BatteryError(f"{prefix}{where}: {message}" if where else prefix + message)

    # ---- typed values ------------------------------------------------------------------------

    def _safe(self, node: Node, where: str) -> None:
        if node.tag not in _SAFE_TAGS:
            raise self.fail(
                node, where,
                f"tag {_short_tag(node.tag)} is not allowed (batteries are plain YAML: "
                "text, numbers, lists and mappings)",
            )

    def mapping(self, node: Node, where: str, expected: str) -> _Mapping:
        self._safe(node, where)
        if not isinstance(node, MappingNode):
            raise self.fail(node, where, f"expected {expected}, got {_describe(node)}")
        return _Mapping(self, node, where)

    def sequence(self, node: Node, where: str) -> list[Node]:
        self._safe(node, where)
        if not isinstance(node, SequenceNode):
            raise self.fail(node, where, f"expected a list, got {_describe(node)}")
        return list(node.value)

    def text(self, node: Node, where: str) -> str:
        """Non-empty text. A plain scalar keeps its text as written: `yes`, `no`, `3` stay text."""
        self._safe(node, where)
        if not isinstance(node, ScalarNode):
            raise self.fail(node, where, f"expected text, got {_describe(node)}")
        if node.tag == _NULL or not node.value.strip():
            raise self.fail(node, where, "is empty")
        return node.value

    def optional_text(self, node: Node | None, where: str) -> str | None:
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL):
            return None
        return self.text(node, where)

    def integer(self, node: Node, where: str, low: int, high: int | None = None) -> int:
        self._safe(node, where)
        if not (isinstance(node, ScalarNode) and node.tag == _INT):
            raise self.fail(node, where, f"expected a whole number, got {_describe(node)}")
        value = self._scalars.construct_yaml_int(node)
        if value < low or (high is not None and value > high):
            allowed = f"{low}..{high}" if high is not None else f"at least {low}"
            raise self.fail(node, where, f"{value} is out of range ({allowed})")
        return value

    def one_of(self, node: Node, where: str, options: tuple[str, ...], what: str) -> str:
        value = self.text(node, where)
        if value not in options:
            raise self.fail(
                node, where, f"'{value}' is not {what} ({', '.join(options)}){_suggest(value, options)}"
            )
        return value

    def text_list(self, node: Node | None, where: str) -> tuple[str, ...]:
        if node is None:
            return ()
        items = self.sequence(node, where)
        return tuple(self.text(item, f"{where[:-1]}[{i}]'") for i, item in enumerate(items))

    def require(self, fields: _Mapping, key: str, hint: str = "") -> Node:
        node = fields.get(key)
        if node is None:
            raise self.fail(fields.node, fields.where, f"missing field '{key}'{hint}")
        return node

    def reject_unknown(self, fields: _Mapping, allowed: tuple[str, ...], owner: str) -> None:
        for key, (key_node, _) in fields.items.items():
            if key in allowed:
                continue
            others = [k for k, keys in _KIND_KEYS.items() if key in keys]
            if others and owner.endswith("scene"):
                message = f"not a field of a {owner} (it belongs to {' and '.join(others)} scenes)"
            else:
                message = f"unknown field{_suggest(key, allowed)} (fields of a {owner}: {', '.join(allowed)})"
            raise self.fail(key_node, _field(fields.where, key), message)

    # ---- the battery -------------------------------------------------------------------------

    def battery(self, root: Node, path: Path) -> Battery:
        top = self.mapping(root, "", "a mapping with " + ", ".join(_TOP_KEYS) + " at the top level")
        self.reject_unknown(top, _TOP_KEYS, "battery")
        name_node = self.require(top, "battery", " (the battery's name)")
        name = self.text(name_node, "field 'battery'")
        description = self.text(self.require(top, "description"), "field 'description'")
        metric_node = self.require(top, "metric", f" (one of {', '.join(KNOWN_MEASURES)}, or a snake_case name)")
        metric = self.text(metric_node, "field 'metric'")
        if not _METRIC_RE.fullmatch(metric):
            raise self.fail(
                metric_node, "field 'metric'",
                f"'{metric}' is not a snake_case name (known measures: {', '.join(KNOWN_MEASURES)})",
            )
        scenes_node = self.require(top, "scenes")
        items = self.sequence(scenes_node, "field 'scenes'")
        if not items:
            raise self.fail(scenes_node, "field 'scenes'", "is empty; a battery needs at least one scene")

        scenes: list[Scene] = []
        fields_of: dict[str, _Mapping] = {}
        for number, item in enumerate(items, start=1):
            scene, fields = self.scene(item, number)
            if scene.id in fields_of:
                first = fields_of[scene.id].node
                raise self.fail(
                    fields.get("id"), _field(fields.where, "id"),
                    f"'{scene.id}' is used twice (first on line {_line(first)})",
                )
            fields_of[scene.id] = fields
            scenes.append(scene)
        self.check_links(scenes, fields_of)
        return Battery(name, description, metric, tuple(scenes), path, line=_line(name_node))

    def scene(self, node: Node, number: int) -> tuple[Scene, _Mapping]:
        label = f"scene #{number}"
        if isinstance(node, MappingNode):  # name the scene by its id even in errors found first
            ids = [v.value for k, v in node.value if isinstance(k, ScalarNode) and k.value == "id"
                   and isinstance(v, ScalarNode) and v.tag != _NULL and _ID_RE.fullmatch(v.value)]
            label = f"scene '{ids[0]}'" if ids else label
        fields = self.mapping(node, label, "a mapping with id and kind")
        scene_id = self.text(self.require(fields, "id"), _field(fields.where, "id"))
        if not _ID_RE.fullmatch(scene_id):
            raise self.fail(
                fields.get("id"), _field(fields.where, "id"),
                f"'{scene_id}' is not a usable id (letters, digits and _ . : - without spaces)",
            )
        fields.where = where = f"scene '{scene_id}'"
        kind = self.one_of(
            self.require(fields, "kind", f" (one of {', '.join(KINDS)})"), _field(where, "kind"), KINDS,
            "a kind of scene",
        )
        self.reject_unknown(fields, _COMMON_KEYS + _KIND_KEYS[kind], f"{kind} scene")

        lang = self.optional_text(fields.get("lang"), _field(where, "lang"))
        if lang is not None and not _LANG_RE.fullmatch(lang):
            raise self.fail(
                fields.get("lang"), _field(where, "lang"),
                f"'{lang}' is not a language code such as en, ru or pt-BR",
            )
        common = dict(
            id=scene_id, lang=lang, tags=self.text_list(fields.get("tags"), _field(where, "tags")),
            line=_line(node),
        )
        if kind == "choice":
            return self.choice(fields, common), fields
        if kind == "generate":
            return self.generate(fields, common), fields
        return PerplexityScene(text=self.text(self.require(fields, "text"), _field(where, "text")), **common), fields

    def choice(self, fields: _Mapping, common: dict) -> ChoiceScene:
        where = fields.where
        prompt = self.text(self.require(fields, "prompt"), _field(where, "prompt"))
        choices_node = self.require(fields, "choices")
        choices = self.text_list(choices_node, _field(where, "choices"))
        if len(choices) < 2:
            raise self.fail(choices_node, _field(where, "choices"), f"needs at least 2 choices, got {len(choices)}")
        for i, choice in enumerate(choices):
            if choice in choices[:i]:
                raise self.fail(
                    choices_node.value[i], _field(where, f"choices[{i}]"),
                    f"'{choice}' repeats choices[{choices.index(choice)}]",
                )
        answer = self.answer(self.require(fields, "answer"), _field(where, "answer"), choices)

        depth_node = fields.get("depth")
        depth = None if depth_node is None else self.integer(depth_node, _field(where, "depth"), 1)
        perturb_node, of_node = fields.get("perturb"), fields.get("of")
        perturb = None if perturb_node is None else self.one_of(
            perturb_node, _field(where, "perturb"), PERTURBATIONS, "a perturbation"
        )
        of = self.optional_text(of_node, _field(where, "of"))
        if perturb is not None and of is None:
            raise self.fail(fields.node, where, "missing field 'of' (the id of the clean scene this perturbs)")
        if of is not None and perturb is None:
            raise self.fail(
                of_node, _field(where, "of"),
                f"'of' needs 'perturb' beside it ({', '.join(PERTURBATIONS)})",
            )
        return ChoiceScene(
            prompt=prompt, choices=choices, answer=answer,
            context=self.optional_text(fields.get("context"), _field(where, "context")),
            depth=depth, group=self.optional_text(fields.get("group"), _field(where, "group")),
            perturb=perturb, of=of, **common,
        )

    def answer(self, node: Node, where: str, choices: tuple[str, ...]) -> int:
        """An int is a 0-based index; anything else is the text of one choice."""
        self._safe(node, where)
        if isinstance(node, ScalarNode) and node.tag == _INT:
            index = self._scalars.construct_yaml_int(node)
            if 0 <= index < len(choices):
                return index
            quote = f"; write answer: \"{node.value}\" to mean the text" if node.value in choices else ""
            raise self.fail(
                node, where,
                f"index {index} is out of range: there are {len(choices)} choices (0..{len(choices) - 1}){quote}",
            )
        if isinstance(node, ScalarNode) and node.tag != _NULL and node.value in choices:
            return choices.index(node.value)
        if not isinstance(node, ScalarNode) or node.tag == _NULL:
            raise self.fail(node, where, f"expected a choice's text or its index, got {_describe(node)}")
        raise self.fail(node, where, f"'{node.value}' is not one of the choices{_suggest(node.value, choices)}")

    def generate(self, fields: _Mapping, common: dict) -> GenerateScene:
        where = fields.where
        prompt = self.text(self.require(fields, "prompt"), _field(where, "prompt"))
        tokens_node = fields.get("max_new_tokens")
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if tokens_node is None else self.integer(
            tokens_node, _field(where, "max_new_tokens"), 1, MAX_NEW_TOKENS_LIMIT
        )
        judge = self.optional_text(fields.get("judge"), _field(where, "judge"))
        checks_node = fields.get("checks")
        if checks_node is None and judge is None:
            raise self.fail(fields.node, where, "missing field 'checks' (a generate scene needs checks or a judge)")
        checks = () if checks_node is None else self.checks(checks_node, _field(where, "checks"))
        if not checks and judge is None:
            raise self.fail(checks_node, _field(where, "checks"), "is empty; give at least one check or a judge")
        return GenerateScene(
            prompt=prompt, checks=checks, max_new_tokens=max_new_tokens, judge=judge,
            group=self.optional_text(fields.get("group"), _field(where, "group")), **common,
        )

    def checks(self, node: Node, where: str) -> tuple[Check, ...]:
        checks: list[Check] = []
        words: dict[str, tuple[int, Node, str]] = {}
        for i, item in enumerate(self.sequence(node, where)):
            item_where = f"{where[:-1]}[{i}]'"
            entry = self.mapping(item, item_where, "a one-key mapping such as {contains: word}")
            if len(entry.items) != 1:
                keys = ", ".join(entry.items) or "none"
                raise self.fail(item, item_where, f"a check has exactly one key, got {keys}; one check per list item")
            (kind, (key_node, value_node)), = entry.items.items()
            check_where = f"{where[:-1]}[{i}].{kind}'"
            if kind not in CHECK_KINDS:
                raise self.fail(
                    key_node, check_where,
                    f"unknown check{_suggest(kind, CHECK_KINDS)} (checks: {', '.join(CHECK_KINDS)})",
                )
            if kind in ("max_words", "min_words"):
                value: str | int = self.integer(value_node, check_where, 1)
                words[kind] = (value, value_node, check_where)
            else:
                value = self.text(value_node, check_where)
                if kind == "regex":
                    try:
                        re.compile(value)
                    except re.error as exc:
                        raise self.fail(value_node, check_where, f"bad regex {value!r}: {exc}") from None
            checks.append(Check(kind, value))
        if "max_words" in words and "min_words" in words and words["min_words"][0] > words["max_words"][0]:
            low, low_node, low_where = words["min_words"]
            raise self.fail(
                low_node, low_where,
                f"min_words {low} is more than max_words {words['max_words'][0]}: no text can pass",
            )
        return tuple(checks)

    def check_links(self, scenes: list[Scene], fields_of: dict[str, _Mapping]) -> None:
        """Cross-scene rules: `of` names a clean choice scene here; a group has 2+ scenes."""
        by_id = {scene.id: scene for scene in scenes}
        groups: dict[str, list[Scene]] = {}
        for scene in scenes:
            fields = fields_of[scene.id]
            if getattr(scene, "group", None):
                groups.setdefault(scene.group, []).append(scene)
            if not isinstance(scene, ChoiceScene) or scene.of is None:
                continue
            of_node, where = fields.get("of"), _field(fields.where, "of")
            target = by_id.get(scene.of)
            if target is None:
                raise self.fail(
                    of_node, where, f"no scene with id '{scene.of}' in this battery{_suggest(scene.of, list(by_id))}"
                )
            if target is scene:
                raise self.fail(of_node, where, "a scene cannot perturb itself")
            if not isinstance(target, ChoiceScene):
                raise self.fail(of_node, where, f"'{target.id}' is a {target.kind} scene; perturb works on choice scenes")
            if target.perturb is not None:
                raise self.fail(
                    of_node, where, f"'{target.id}' is itself perturbed; point at its clean scene '{target.of}'"
                )
            if scene.perturb == "rotated":
                same = sorted(scene.choices) == sorted(target.choices) and scene.answer_text == target.answer_text
                if not same or scene.choices == target.choices:
                    raise self.fail(
                        fields.get("choices"), _field(fields.where, "choices"),
                        f"a rotated scene must hold the choices of '{target.id}' in another order, with the same answer",
                    )
        for name, members in groups.items():
            if len(members) == 1:
                fields = fields_of[members[0].id]
                raise self.fail(
                    fields.get("group"), _field(fields.where, "group"),
                    f"group '{name}' has only this scene; a group is 2 or more scenes that must agree",
                )


# --- a folder's counts (ltm-tui scenes check) ------------------------------------------------------


def battery_counts(batteries: list[Battery]) -> dict:
    """Per battery: its measure, scenes by kind and by language; then totals per measure."""
    rows, by_measure = [], {}
    for b in batteries:
        kinds: dict[str, int] = {}
        langs: dict[str, int] = {}
        for scene in b.scenes:
            kinds[scene.kind] = kinds.get(scene.kind, 0) + 1
            langs[scene.lang or "-"] = langs.get(scene.lang or "-", 0) + 1
        rows.append({"battery": b.name, "file": str(b.path), "metric": b.metric, "scenes": len(b.scenes),
                     "kinds": kinds, "langs": langs})
        total = by_measure.setdefault(b.metric, {"batteries": 0, "scenes": 0, "langs": {}})
        total["batteries"] += 1
        total["scenes"] += len(b.scenes)
        for lang, n in langs.items():
            total["langs"][lang] = total["langs"].get(lang, 0) + n
    return {"batteries": rows, "measures": by_measure}


# --- lm-evaluation-harness tasks → a battery (ltm-tui scenes import-lmeval) -------------------------


def import_lmeval(task_path: str | Path, *, metric: str | None = None, limit: int | None = None) -> tuple[str, int]:
    """Convert a `multiple_choice` lm-evaluation-harness task with local data files into battery
    YAML; returns (text, scenes). doc_to_text / doc_to_choice / doc_to_target may be a field name,
    a literal, or a simple Jinja template (rendered in a sandbox). The prompt is the harness's
    context and each choice follows " ", so `choice` scores equal the harness's acc/acc_norm."""
    path = Path(task_path)
    name = str(path)
    try:
        task = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BatteryError(f"{name}: no such file") from None
    except yaml.constructor.ConstructorError as exc:
        raise BatteryError(
            f"{name}: uses a YAML tag ({' '.join(str(exc.problem).split())[:60]}); only tasks written with "
            "fields and Jinja templates can be imported, not !function ones"
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise BatteryError(f"{name}: cannot read the task: {' '.join(str(exc).split())[:160]}") from None
    if not isinstance(task, dict):
        raise BatteryError(f"{name}: an lm-eval task is a mapping with task, dataset_path, doc_to_text, ...")
    if task.get("output_type", "multiple_choice") != "multiple_choice":
        raise BatteryError(f"{name}: output_type {task['output_type']!r}: only multiple_choice tasks can be imported")
    if task.get("target_delimiter", " ") != " ":
        raise BatteryError(f"{name}: target_delimiter {task['target_delimiter']!r}: batteries use a single space")
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        if key not in task:
            raise BatteryError(f"{name}: field '{key}' is missing")
    docs = _lmeval_docs(path, task)
    if limit:
        docs = docs[:limit]
    task_name = str(task.get("task") or path.stem)
    scenes, skipped = [], 0
    for i, doc in enumerate(docs):
        where = f"{name}: document {i}"
        prompt = str(_render(task["doc_to_text"], doc, where, "doc_to_text"))
        choices = _render(task["doc_to_choice"], doc, where, "doc_to_choice")
        if isinstance(choices, str):
            import ast

            try:
                choices = ast.literal_eval(choices.strip())
            except (ValueError, SyntaxError):
                raise BatteryError(f"{where}: doc_to_choice gave {choices[:60]!r}, not a list") from None
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise BatteryError(f"{where}: doc_to_choice must give a list of 2 or more choices")
        choices = [str(c) for c in choices]
        target = _render(task["doc_to_target"], doc, where, "doc_to_target")
        if isinstance(target, str) and target.strip().lstrip("-").isdigit() and target.strip() not in choices:
            target = int(target.strip())
        if isinstance(target, bool) or not isinstance(target, (int, str)):
            raise BatteryError(f"{where}: doc_to_target gave {target!r}; expected an index or a choice's text")
        answer = target if isinstance(target, int) else (choices.index(target) if target in choices else None)
        if answer is None or not 0 <= answer < len(choices):
            raise BatteryError(f"{where}: doc_to_target {target!r} is not one of {len(choices)} choices")
        if len(set(choices)) != len(choices) or not prompt.strip() or any(not c.strip() for c in choices):
            skipped += 1  # a battery needs distinct, non-empty choices and a prompt
            continue
        scenes.append({"id": f"{_slug(task_name)}-{i}", "kind": "choice", "prompt": prompt,
                       "choices": choices, "answer": answer})
    if not scenes:
        raise BatteryError(f"{name}: no document could be converted")
    battery = {
        "battery": task_name,
        "description": f"Imported from the lm-evaluation-harness task {task_name} ({len(scenes)} documents"
                       + (f", {skipped} skipped: repeated or empty choices" if skipped else "") + ").",
        "metric": metric or _slug(task_name).replace("-", "_").replace(".", "_"),
        "scenes": scenes,
    }
    header = f"# Converted by `ltm-tui scenes import-lmeval {name}`; schema: docs/scenes.md\n"
    return header + yaml.safe_dump(battery, allow_unicode=True, sort_keys=False, width=100), len(scenes)


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.:-]+", "-", text).strip("-").lower()
    return slug if slug and slug[0].isalnum() else "task" + slug


def _lmeval_docs(path: Path, task: dict) -> list[dict]:
    import csv
    import json

    fmt = str(task.get("dataset_path", ""))
    files = (task.get("dataset_kwargs") or {}).get("data_files")
    if fmt not in ("json", "csv") or not files:
        raise BatteryError(
            f"{path}: dataset_path {fmt!r}: only local data files can be imported "
            "(dataset_path: json or csv, with dataset_kwargs: data_files)"
        )
    split = task.get("test_split") or task.get("validation_split") or task.get("training_split") or "train"
    if isinstance(files, dict):
        if split not in files:
            raise BatteryError(f"{path}: data_files has no split {split!r} (it has {', '.join(files)})")
        files = files[split]
    docs: list[dict] = []
    for entry in [files] if isinstance(files, str) else list(files):
        file = Path(entry)
        if not file.is_absolute() and not file.exists():
            file = path.parent / entry
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise BatteryError(f"{path}: data file {entry}: {exc.strerror or exc}") from None
        if fmt == "csv":
            import io

            docs += list(csv.DictReader(io.StringIO(text)))
            continue
        try:
            loaded = json.loads(text)
            docs += loaded if isinstance(loaded, list) else [loaded]
        except json.JSONDecodeError:
            try:
                docs += [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as exc:
                raise BatteryError(f"{path}: data file {entry}: not JSON or JSON lines ({exc.msg}, line {exc.lineno})") from None
    return docs


def _render(spec, doc: dict, where: str, key: str):
    """lm-eval's convention: a field of the document, a Jinja template, or a literal."""
    if isinstance(spec, (list, int)) and not isinstance(spec, bool):
        return spec
    if not isinstance(spec, str):
        raise BatteryError(f"{where}: {key} must be a field name, a template or a literal, not {type(spec).__name__}")
    if spec in doc:
        return doc[spec]
    if "{{" in spec or "{%" in spec:
        from jinja2 import StrictUndefined, TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
        try:
            return env.from_string(spec).render(**doc)
        except TemplateError as exc:
            raise BatteryError(f"{where}: {key} template: {' '.join(str(exc).split())[:120]}") from None
    return spec
