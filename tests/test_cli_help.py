"""Every command's --help, and every subcommand's, formats: no stray `%%` (argparse
%-formats argument help, not descriptions), no formatting error."""

import argparse
import importlib

import pytest

COMMANDS = ["segdist.tune", "segdist.report", "segdist.evaluate", "segdist.shards", "segdist.bench.__main__",
            "segdist.models.__main__", "segdist.predict"]


class _Parsed(Exception):
    pass


def parsers_of(module_name, monkeypatch):
    """The parser a command's main() builds, and its subcommands' parsers, by name."""
    found = []

    def grab(self, *args, **kwargs):
        found.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Parsed):
        importlib.import_module(module_name).main([])
    out, todo = {}, [(module_name, found[0])]
    while todo:
        name, parser = todo.pop()
        out[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return out


@pytest.mark.parametrize("module_name", COMMANDS)
def test_help_texts_format_without_stray_percent_signs(module_name, monkeypatch):
    parsers = parsers_of(module_name, monkeypatch)
    for name, parser in parsers.items():
        text = parser.format_help()
        assert "%%" not in text and "%(" not in text, name
    if module_name == "segdist.report":
        assert "95% CI" in parsers[module_name].format_help()
