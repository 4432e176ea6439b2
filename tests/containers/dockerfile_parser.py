"""A small Dockerfile reader for the tests: instructions, stages, build args, COPY sources.

Only what the tests need (no Docker engine runs on the test machines): line continuations,
comments, ``ARG`` defaults substituted into ``FROM``/``COPY``, ``ENV`` key=value pairs, and
a ``.dockerignore`` matcher with Docker's "last matching rule wins" semantics.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def flags(self) -> dict[str, str]:
        """``--from=x --chown=y`` style flags at the start of the arguments."""
        out = {}
        for token in shlex.split(self.args):
            if not token.startswith("--"):
                break
            key, _, value = token[2:].partition("=")
            out[key] = value
        return out

    def positional(self) -> list[str]:
        """The arguments after the flags (JSON exec form or whitespace separated)."""
        text = self.args.strip()
        if text.startswith("["):
            return json.loads(text)
        tokens = shlex.split(text)
        while tokens and tokens[0].startswith("--"):
            tokens.pop(0)
        return tokens


@dataclass
class Stage:
    index: int
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def find(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The ENV values set in this stage (later ones win)."""
        out: dict[str, str] = {}
        for ins in self.find("ENV"):
            tokens = shlex.split(ins.args)
            if tokens and "=" not in tokens[0]:  # legacy "ENV KEY value"
                out[tokens[0]] = " ".join(tokens[1:])
                continue
            for token in tokens:
                key, _, value = token.partition("=")
                out[key] = value
        return out


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations, drop comments and blank lines; keep the first line number."""
    out: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):  # comment inside a continued instruction
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        out.append((start, buffer))
        buffer = ""
    if buffer:
        out.append((start, buffer))
    return out


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace ``$NAME``/``${NAME}`` with build-arg values (unknown names are left alone)."""
    def repl(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


class Dockerfile:
    """The parsed file: global build args and stages with their instructions."""

    def __init__(self, path: Path, build_args: dict[str, str] | None = None):
        self.path = Path(path)
        self.instructions = [
            Instruction(line.split(None, 1)[0].upper(), (line.split(None, 1) + [""])[1], number)
            for number, line in logical_lines(self.path.read_text())
        ]
        self.global_args: dict[str, str] = {}
        self.stages: list[Stage] = []
        for ins in self.instructions:
            if ins.keyword == "ARG" and not self.stages:
                name, _, default = ins.args.strip().partition("=")
                self.global_args[name] = default.strip('"')
            elif ins.keyword == "FROM":
                tokens = ins.args.split()
                tokens = [t for t in tokens if not t.startswith("--platform")]
                name = tokens[2] if len(tokens) >= 3 and tokens[1].upper() == "AS" else None
                self.stages.append(Stage(len(self.stages), tokens[0], name, [ins]))
            elif self.stages:
                self.stages[-1].instructions.append(ins)
        self.args = {**self.global_args, **(build_args or {})}

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name or str(stage.index) == name:
                return stage
        raise KeyError(name)

    def stage_names(self) -> set[str]:
        return {s.name for s in self.stages if s.name}

    def base_of(self, stage: Stage) -> str:
        return substitute(stage.base, self.args)

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def _pattern_regex(pattern: str) -> re.Pattern:
    """Go ``filepath.Match`` style: ``*`` and ``?`` stay within one folder, ``**`` crosses folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(patterns_file: Path, relpath: str) -> bool:
    """True when ``relpath`` is left out of the build context by ``.dockerignore``.

    As Docker does: each rule in order, matched against the path or any of its parent
    folders, sets excluded (or, with ``!``, included); the last matching rule wins.
    """
    rules = []
    for raw in patterns_file.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = (line[1:] if negate else line).strip().strip("/")
        rules.append((negate, _pattern_regex(pattern)))
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded
