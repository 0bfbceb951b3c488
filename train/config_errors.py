"""Config mistakes as one line that says what to do, before anything runs.

``--config.FIELD=VALUE`` overrides are checked against the loaded config before absl and
ml_collections apply them: an unknown or misspelt field (at any depth) names the field, the
config file and the nearest known names; a value of the wrong type names the field, the type
it takes, the value given and the file. A config file can also be checked against a schema
(``check_fields``: every field it sets is one of, e.g., ``train.defaults.base_config()``).

Command lines use ``define_config_file`` instead of ``config_flags.DEFINE_config_file`` and
pass ``parse_flags`` to ``absl.app.run(..., flags_parser=parse_flags)``: a config mistake, or
any other flag error, prints ``error: ...`` on stderr and exits with status 2 (usage), with no
traceback. Values of the right type that are out of range are the trainer's to reject.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Iterator

import ml_collections
from absl import flags
from ml_collections import config_flags

USAGE_EXIT = 2  # the exit status of a command-line mistake

# the absl parsers ml_collections uses for these field types (others: not checked here)
_PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser()}
_TYPE_NAMES = {bool: "true or false", int: "an int", float: "a float"}
_DEFERRED_DEFAULTS: dict[str, str] = {}  # flag name -> default config file, loaded by parse_flags
flags.disclaim_key_flags()  # the flags defined here belong to the caller's module (its --helpshort)


class ConfigError(ValueError):
  """A field a config does not have, or a value of the wrong type; the message names the
  field, the config file and what to use instead."""


def _paths(node: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
  """Every field's dotted name under ``node``, groups included."""
  for key, value in node.items():
    yield prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      yield from _paths(value, f"{prefix}{key}.")


def nearest(name: str, config: ml_collections.ConfigDict, n: int = 3) -> list[str]:
  """The dotted field names of ``config`` closest to ``name`` (difflib), compared whole and by
  their last part (``steps`` finds ``train.steps``); best first, only those near the best."""
  last = name.rsplit(".", 1)[-1]
  scores = {}
  for path in _paths(config):
    whole = difflib.SequenceMatcher(None, name, path).ratio()
    tail = difflib.SequenceMatcher(None, last, path.rsplit(".", 1)[-1]).ratio() - 0.05  # whole first
    scores[path] = max(whole, tail)
  ranked = sorted((s, p) for p, s in scores.items() if s >= 0.75)[::-1]
  return [p for s, p in ranked if s >= ranked[0][0] - 0.1][:n]


def error_text(e: BaseException) -> str:
  """``e``'s message on one line; ConfigDict's ``AttributeError(KeyError(message))`` unwrapped."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return " ".join(str(e.args[0] if len(e.args) == 1 else e).split())


def _or(names: list[str]) -> str:
  return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def find_field(config: ml_collections.ConfigDict, path: str,
               source: str) -> tuple[ml_collections.ConfigDict, str] | None:
  """The group holding field ``path`` (dotted) of ``config`` and the field's name; None when
  the path goes through a field left unset (None) or indexes a list (ml_collections decides);
  a ``ConfigError`` naming ``source`` and the nearest names when there is no such field."""
  if "[" in path:
    return None
  node, parts = config, path.split(".")
  for i, key in enumerate(parts):
    here = ".".join(parts[:i])
    if node is None:
      return None
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"{source} has no field {path} ({here} is {type(node).__name__} "
                        f"{node!r}, not a group of fields)")
    if key not in node:
      near = nearest(path, config)
      hint = (f"did you mean {_or(near)}?" if near else
              f"the fields of {here or 'the config'} are {', '.join(sorted(node.keys())) or '(none)'}")
      raise ConfigError(f"{source} has no field {path}; {hint}")
    if i < len(parts) - 1:
      node = node[key]
  return node, parts[-1]


def check_override(config: ml_collections.ConfigDict, path: str, value: str | None, source: str) -> None:
  """``--config.PATH=VALUE`` (``value`` None: a bare ``--config.PATH``) is a field of
  ``config`` (loaded from ``source``) and, for bool, int and float fields, a value that absl
  parses as that type; else a ``ConfigError`` naming all four."""
  found = find_field(config, path, source)
  if found is None:
    return
  group, key = found
  kind = group.get_type(key)
  if value is None or kind not in _PARSERS:
    return
  try:
    _PARSERS[kind].parse(value)
  except ValueError:
    raise ConfigError(f"{path} of {source} takes {_TYPE_NAMES[kind]} (default {group[key]!r}), "
                      f"not {value!r}") from None


def check_fields(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, source: str,
                 schema_name: str) -> None:
  """Every field ``config`` (from ``source``) sets is a field of ``schema`` (called
  ``schema_name`` in messages); a group that is empty in the schema takes any fields (e.g.
  ``model.llm``: the LLM's own config). Else a ``ConfigError`` naming the field, the file and
  the schema's nearest names."""
  def walk(node: ml_collections.ConfigDict, known: ml_collections.ConfigDict, prefix: str) -> None:
    for key, value in node.items():
      path = prefix + key
      if key not in known:
        near = nearest(path, schema)
        raise ConfigError(f"{source} sets {path}, which is not a field of {schema_name}"
                          + (f"; did you mean {_or(near)}?" if near else ""))
      if isinstance(value, ml_collections.ConfigDict) and isinstance(known[key], ml_collections.ConfigDict) \
          and known[key]:
        walk(value, known[key], f"{path}.")
  walk(config, schema, "")


def overrides(argv: list[str], name: str,
              config: ml_collections.ConfigDict) -> Iterator[tuple[str, str | None]]:
  """The ``(field path, value)`` of each ``--NAME.PATH=VALUE``, ``--NAME.PATH VALUE``,
  ``--NAME.PATH`` (a bool: value None) and ``--noNAME.PATH`` in ``argv``, as absl reads them."""
  pattern = re.compile(rf"^--?(no)?{re.escape(name)}\.([^=]*)(?:=(.*))?$", re.DOTALL)
  i = 1
  while i < len(argv) and argv[i] != "--":
    m = pattern.match(argv[i])
    i += 1
    if m is None:
      continue
    negated, path, value = m.groups()
    if value is None and not negated and not _is_bool(config, path) and i < len(argv):
      value, i = argv[i], i + 1
    yield path, (None if negated else value)


def _is_bool(config: ml_collections.ConfigDict, path: str) -> bool:
  try:
    found = find_field(config, path, "")
  except ConfigError:
    return True  # reported by check_override; do not take the next argument as its value
  return found is None or found[0].get_type(found[1]) is bool


class _CheckedConfigFile(flags.ArgumentParser):
  """ml_collections' config-file parser (``loader``), then checks of the loaded config (against
  ``schema``, then against the command line's overrides) before ml_collections applies them."""

  def __init__(self, name: str, loader: flags.ArgumentParser,
               schema: Callable[[], ml_collections.ConfigDict] | None):
    self.name, self._loader, self._schema = name, loader, schema

  def flag_type(self) -> str:
    return self._loader.flag_type()

  def parse(self, path: str) -> ml_collections.ConfigDict:
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
      raise ConfigError(f"--{self.name}={path}: there is no config file {file}")
    try:
      config = self._loader.parse(path)
    except SyntaxError as e:
      raise ConfigError(f"--{self.name}={path}: {e.filename}:{e.lineno}: {e.msg}") from None
    except AttributeError as e:
      said = (f"{file} has no get_config()" if e.name == "get_config" else
              f"get_config() failed: {error_text(e)}")
      raise ConfigError(f"--{self.name}={path}: {said}") from None
    except (TypeError, ValueError) as e:  # raised by get_config; ml_collections put its traceback in e
      raise ConfigError(f"--{self.name}={path}: {error_text(e.__context__ or e)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
      raise ConfigError(f"--{self.name}={path}: get_config() returned {type(config).__name__}, "
                        "not a ConfigDict")
    if self._schema is not None:
      check_fields(config, self._schema(), path, f"{self._schema.__module__}.{self._schema.__qualname__}()")
    argv = flags.FLAGS.read_flags_from_files(sys.argv, force_gnu=False)  # what ml_collections reads
    for field, value in overrides(argv, self.name, config):
      try:
        check_override(config, field, value, path)
      except ConfigError as e:
        shown = f"--{self.name}.{field}" + ("" if value is None else f"={value}")
        raise ConfigError(f"{shown}: {e}") from None
    return config


def define_config_file(name: str, default: str | None, help_string: str,
                       schema: Callable[[], ml_collections.ConfigDict] | None = None) -> flags.FlagHolder:
  """``config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)`` whose
  config is checked as it loads (``_CheckedConfigFile``; ``schema``: a function returning
  every field a config file may set). The default file is loaded by ``parse_flags``, not at import, so that
  its mistakes too are reported there."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
  flag = flags.FLAGS[name]
  flag.parser = _CheckedConfigFile(name, flag.parser, schema)
  if default is not None:
    _DEFERRED_DEFAULTS[name] = default
  return holder


def config_error(e: BaseException) -> ConfigError | None:
  """The ``ConfigError`` behind ``e`` (absl wraps a parser's ValueError in its own error)."""
  while e is not None and not isinstance(e, ConfigError):
    e = e.__cause__ or e.__context__
  return e


def parse_flags(argv: list[str]) -> list[str]:
  """``absl.app.run``'s ``flags_parser``: ``FLAGS(argv)`` (after loading the deferred default
  config files); a config mistake or any other flag error: ``error: ...`` on stderr, exit 2."""
  try:
    for name, default in _DEFERRED_DEFAULTS.items():
      flags.FLAGS.set_default(name, default)
    return flags.FLAGS(argv)
  except (ConfigError, flags.Error) as e:
    message = str(config_error(e) or f"{e} (--helpshort lists the flags)")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT)
