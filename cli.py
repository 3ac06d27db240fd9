"""
Command lines from config dataclasses, the same in every tool (train.py, toy.py, experiments/): an option per field,
spelled --field-name (--field_name works too), explained by the field's own comment, typed by its default; JSON config
files checked the same way. Every mistake is one line that names the option, the rule and the value (argparse exits 2).
"""

import argparse
import dataclasses
import inspect
import json
import re

import torch


def parser(prog, doc):
    """An ArgumentParser with the project's conventions: the module docstring as description, a short usage line, and
    no abbreviations (a misspelt option is an error, not a guess)."""
    return argparse.ArgumentParser(prog=prog, usage="%(prog)s [options]  (--help lists them)", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)


def field_help(cls):
    """{field: its comment} from a config dataclass's source: each option is explained once, where it is defined."""
    comments = re.findall(r"^    (\w+): [^=\n]+=[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.MULTILINE)
    return dict(comments)


def parse_value(value, default, name):
    """A value from the command line (text) or a config file (JSON), typed as the field's default: bool, int,
    float, str or a tuple of them. A value that does not fit raises ValueError naming the option."""
    if isinstance(default, bool):  # before int: a bool is an int
        words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
        if isinstance(value, bool) or str(value).lower() in words:
            return value if isinstance(value, bool) else words[str(value).lower()]
        raise ValueError(f"--{name} takes true or false, not {value!r}")
    if isinstance(default, tuple):
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        kinds = [type(x) for x in default] or [str]
        try:
            return tuple(kinds[min(k, len(kinds) - 1)](x) for k, x in enumerate(items))
        except ValueError:
            raise ValueError(f"--{name} takes values like {','.join(map(str, default))}, not {value!r}") from None
    typ = type(default)
    if isinstance(value, str) or type(value) is typ or (typ is float and type(value) is int):
        try:
            return typ(value)
        except ValueError:
            pass
    raise ValueError(f"--{name} takes {'an' if typ is int else 'a'} {typ.__name__}, not {value!r}")


def add_config_options(parser, cls, defaults=None):
    """An option --field-name (or --field_name) for every field of a config dataclass, its help the field's comment.
    Values are kept as given (typed later by config_from), so that only the options a user gives override."""
    defaults = defaults or cls()
    notes = field_help(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields (--key=value or --key value)")
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else '""' if value == "" else value
        kw = dict(nargs="?", const="true", metavar="BOOL") if isinstance(value, bool) else \
            dict(metavar=type(value).__name__.upper())
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                           help=f"{notes.get(f.name, '')} (default: {shown})", **kw)


def config_from(cls, values, base=None):
    """base (or the defaults) with values {field: text or JSON value} set, each typed as its field; a bad value or an
    unknown field raises ValueError naming it."""
    base = base or cls()
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; the options are: {', '.join(sorted(names))}")
    return dataclasses.replace(base, **{k: parse_value(v, getattr(base, k), k) for k, v in values.items()})


def underscores_to_dashes(argv):
    """--max_steps=3 -> --max-steps=3: both spellings of a field's option are accepted, the dashed one is shown."""
    return [a.split("=", 1)[0].replace("_", "-") + a[len(a.split("=", 1)[0]):] if a.startswith("--") else a
            for a in argv]


def read_json_object(path, what):
    """A JSON file holding an object (a config's fields); any other content raises ValueError naming the file."""
    try:
        with open(path) as f:
            values = json.load(f)
    except OSError as e:
        raise ValueError(f"{what} {path}: {e.strerror}; give the path of a JSON file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold a JSON object of the config's fields, not {type(values).__name__}")
    return values


def device(name):
    """A device this machine has, for --device: the name given (checked), or with None the first of cuda, mps, cpu.
    Anything else is a ValueError that names it and says what there is."""
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name is None:
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device name; use cuda, cuda:N, mps or cpu") from None
    if kind not in ("cuda", "mps", "cpu"):
        raise ValueError(f"--device {name}: only cuda, mps and cpu are supported")
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not mps):
        raise ValueError(f"--device {name}: this machine has no {kind.upper()} device that torch can use; use "
                         "--device cpu, or leave --device out to take the first there is")
    return name
