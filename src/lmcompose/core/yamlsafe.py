"""Reading recipes, search spaces and other settings a user writes: plain YAML or JSON, with limits.

``yaml.safe_load`` never runs code, but a hostile or careless file can still hurt: a YAML alias bomb of a
few hundred bytes expands to billions of nodes once something walks it, deep nesting ends in a
RecursionError, a duplicated key silently wins, several documents or a NUL byte give a raw parser
traceback. Here every such file raises `RecipeError` (a ``ValueError``) with one line naming the file,
the line and what is allowed:

* at most `MAX_BYTES` of UTF-8 text, no NUL byte, one document;
* plain values only: mappings (with scalar keys, each once), lists, strings, numbers, booleans, null
  (no ``!!python/...``, ``!!binary``, ``!!set`` or dates);
* at most `MAX_DEPTH` levels of nesting and `MAX_NODES` values once aliases are expanded (aliases and
  merge keys stay legal; an alias that contains itself does not).

The limits are checked on the composed YAML nodes, before any Python object is built, in time linear in
the text (a node's expanded size is computed once, however often it is aliased).

Example::

    data = load_file("recipe.yaml")          # .json files are read as JSON, anything else as YAML
    data = parse_yaml("steps: [{rtn: {bits: 4}}]", where="--recipe")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from .errors import RecipeError
from .messages import clipped, shown

MAX_BYTES = 1 << 20  # 1 MiB: a recipe or a search space is a few hundred bytes
MAX_DEPTH = 32  # nesting levels (a recipe needs 5: steps, a step, its settings, a dict of lrs, a value)
MAX_NODES = 100_000  # values after aliases are expanded

_TAG = "tag:yaml.org,2002:"
PLAIN_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge")}


def _line(node_or_mark) -> str:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return f"line {mark.line + 1}" if mark is not None else "?"


class _Loader(yaml.SafeLoader):
    """The safe loader with a nesting limit while composing and duplicate keys refused while constructing."""

    where = "<text>"

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise RecipeError(f"{self.where}: {_line(self.peek_event())}: nested more than {MAX_DEPTH} levels "
                                  "deep; allowed: a plain recipe (a few levels)")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == _TAG + "merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise RecipeError(f"{self.where}: {_line(key_node)}: key {shown(key)} appears twice (first on line "
                                  f"{seen[key]}); allowed: each key once")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _check_nodes(root: yaml.Node, where: str) -> None:
    """Refuse tags other than `PLAIN_TAGS`, non-scalar keys, self-containing aliases, and a tree deeper than
    `MAX_DEPTH` or larger than `MAX_NODES` once aliases expand (each node's size and height computed once)."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
    open_: set[int] = set()

    def walk(node, depth: int) -> tuple[int, int]:
        if id(node) in done:
            size, height = done[id(node)]
        else:
            if id(node) in open_:
                raise RecipeError(f"{where}: {_line(node)}: an alias refers to a node that contains it; allowed: "
                                  "aliases of finished nodes")
            if node.tag not in PLAIN_TAGS:
                raise RecipeError(f"{where}: {_line(node)}: tag {shown(node.tag.replace(_TAG, '!!'))} is not allowed; "
                                  "allowed: plain mappings, lists, strings, numbers, booleans and null (quote a "
                                  "value to make it a string)")
            if depth > MAX_DEPTH:
                raise RecipeError(f"{where}: {_line(node)}: nested more than {MAX_DEPTH} levels deep once aliases "
                                  "are expanded")
            open_.add(id(node))
            size, height = 1, 0
            if isinstance(node, yaml.MappingNode):
                children = []
                for key, value in node.value:
                    if not isinstance(key, yaml.ScalarNode):
                        raise RecipeError(f"{where}: {_line(key)}: a mapping key must be a plain string, number or "
                                          "boolean, not a list or a mapping")
                    children += [key, value]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else []
            for child in children:
                s, h = walk(child, depth + 1)
                size, height = size + s, max(height, h + 1)
                if size > MAX_NODES:
                    raise RecipeError(f"{where}: {_line(node)}: expands to more than {MAX_NODES:,} values (aliases "
                                      "counted each time they are used); allowed: a plain recipe")
            open_.discard(id(node))
            done[id(node)] = (size, height)
        if depth + height > MAX_DEPTH:
            raise RecipeError(f"{where}: {_line(node)}: nested more than {MAX_DEPTH} levels deep once aliases "
                              "are expanded")
        return size, height

    walk(root, 1)


def _check_text(text: str, where: str) -> None:
    if len(text) > MAX_BYTES:
        raise RecipeError(f"{where}: {len(text):,} characters; allowed: at most {MAX_BYTES:,}")
    at = text.find("\x00")
    if at >= 0:
        raise RecipeError(f"{where}: a NUL byte at character {at}; allowed: text only")


def parse_yaml(text: str, where: str = "<text>"):
    """The one YAML document in `text` as plain Python values; `RecipeError` for anything else."""
    _check_text(text, where)
    loader = None
    try:
        loader = type("Loader", (_Loader,), {"where": where})(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, where)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = " ".join(str(err.problem or err.context or "not YAML").split())
        if "another document" in problem:
            raise RecipeError(f"{where}: {_line(mark)}: a second YAML document ('---'); allowed: one document "
                              "per file") from None
        if "'\\t'" in problem:
            problem += " (YAML indents with spaces, not tabs)"
        column = f", column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{where}: {_line(mark)}{column}: not valid YAML: {clipped(problem)}") from None
    except yaml.YAMLError as err:  # reader errors (unprintable characters) and the like
        raise RecipeError(f"{where}: not valid YAML: {clipped(str(err))}") from None
    except RecursionError:  # a limit above should come first; this is the last line of defence
        raise RecipeError(f"{where}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_tree(value, where: str) -> None:
    """`MAX_DEPTH` and `MAX_NODES` on plain Python values (what JSON gives: no shared references)."""
    count = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise RecipeError(f"{where}: nested more than {MAX_DEPTH} levels deep; allowed: a plain recipe")
        if count > MAX_NODES:
            raise RecipeError(f"{where}: more than {MAX_NODES:,} values; allowed: a plain recipe")
        if isinstance(item, dict):
            stack += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]


def parse_json(text: str, where: str = "<text>"):
    """The JSON value in `text`; `RecipeError` for invalid JSON, a duplicate key, NaN/Infinity or the limits."""
    _check_text(text, where)

    def pairs(items):
        out = {}
        for key, value in items:
            if key in out:
                raise RecipeError(f"{where}: key {shown(key)} appears twice in one object; allowed: each key once")
            out[key] = value
        return out

    def constant(name):
        raise RecipeError(f"{where}: {name} is not allowed; allowed: finite numbers")

    try:
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as err:
        raise RecipeError(f"{where}: line {err.lineno}, column {err.colno}: not valid JSON: {err.msg}") from None
    except RecursionError:
        raise RecipeError(f"{where}: nested too deeply; allowed: at most {MAX_DEPTH} levels") from None
    _check_tree(value, where)
    return value


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of the regular file `path` (at most `MAX_BYTES`); FileNotFoundError or RecipeError."""
    path = Path(path)
    where = f"{what} {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist")
    if not path.is_file():
        raise RecipeError(f"{where} is not a regular file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise RecipeError(f"{where} has {size:,} bytes; allowed: at most {MAX_BYTES:,}")
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise RecipeError(f"{where} has more than {MAX_BYTES:,} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{where}: not UTF-8 text (byte {err.start}); allowed: a UTF-8 YAML or JSON file") from None


def load_file(path: str | os.PathLike, what: str = "file"):
    """The value a settings file holds: JSON for a ``.json`` file, YAML otherwise (YAML is a superset)."""
    path = Path(path)
    text = read_text(path, what)
    where = f"{what} {str(path)!r}"
    return parse_json(text, where) if path.suffix.lower() == ".json" else parse_yaml(text, where)
