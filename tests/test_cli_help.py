"""Every `adatok` verb answers `--help` with its usage and exit status 0 (no traceback, no work done)."""

import pytest

from adatok_vlm import cli


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_has_a_help(verb, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([verb, "--help"])
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    assert "usage" in out.lower() or "--" in out, out


# ---------------------------------------------------------------------------------------------
# every verb's --help lists every option it accepts, in the one flag style
# ---------------------------------------------------------------------------------------------
import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import typing  # noqa: E402

# Verbs that do not follow the one flag style yet (strict xfail: the mark must go once one does). None today.
NOT_YET_ONE_STYLE: dict[str, str] = {}


def config_options(cls, prefix: str = "") -> list[str]:
    """``--section.field`` for every field of a trainer config dataclass (what ``config_help`` prints)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_options(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"--{prefix}{f.name}")
    return out


def help_of(verb, monkeypatch, capsys):
    """``(help text, parsers, config classes)`` of ``adatok VERB --help``: the argparse parsers and the config
    dataclasses the verb consulted while answering."""
    from adatok_vlm.training import config

    parsers, classes = [], []
    original_parse = argparse.ArgumentParser.parse_known_args

    def recording_parse(self, *args, **kwargs):
        parsers.append(self)
        return original_parse(self, *args, **kwargs)

    original_help = config.config_help

    def recording_help(cls):
        classes.append(cls)
        return original_help(cls)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording_parse)
    for module in [m for n, m in list(sys.modules.items()) if n.startswith("adatok_vlm")]:
        if vars(module).get("config_help") is original_help:
            monkeypatch.setattr(module, "config_help", recording_help)
    with pytest.raises(SystemExit):
        cli.main([verb, "--help"])
    return capsys.readouterr().out, parsers, classes


def accepted_options(parsers, classes) -> set[str]:
    from adatok_vlm.training.config import SHORT_FLAGS
    from adatok_vlm.training.flags import FlagParser

    names = set()
    for p in parsers:
        names |= {s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
        if isinstance(p, FlagParser):
            names |= set(p.old_spellings())
    for cls in classes:
        names |= set(config_options(cls)) | {f"--{k}" for k in SHORT_FLAGS} | {"--config"}
    return names


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_help_lists_every_option_it_accepts(verb, monkeypatch, capsys):
    import adatok_vlm.training.config  # noqa: F401  (imported before the help runs, so its name can be patched)

    out, parsers, classes = help_of(verb, monkeypatch, capsys)
    assert parsers or classes, f"adatok {verb} --help consulted no parser and no config class"
    missing = sorted(o for o in accepted_options(parsers, classes) if o not in out)
    assert not missing, f"adatok {verb} --help does not mention {missing}"


@pytest.mark.parametrize("verb", [pytest.param(v, marks=pytest.mark.xfail(strict=True, reason=NOT_YET_ONE_STYLE[v]))
                                  if v in NOT_YET_ONE_STYLE else v for v in sorted(cli.VERBS)])
def test_every_verb_accepts_the_one_flag_style(verb, monkeypatch, capsys):
    """Long options are spelt with underscores (``--per_class``, ``--output_dir``, ``--train.lr``): a hyphen
    inside an option's name is only ever a deprecated alias."""
    _, parsers, classes = help_of(verb, monkeypatch, capsys)
    primary = {s for p in parsers for a in p._actions for s in a.option_strings if s.startswith("--")}
    primary |= {o for cls in classes for o in config_options(cls)}
    hyphenated = sorted(o for o in primary if "-" in o[2:])
    assert not hyphenated, f"adatok {verb} spells {hyphenated} with hyphens; use underscores"


OLD_SPELLINGS = [
    ("sample-c2i", "adatok sample-c2i", ["--dit", "D", "--out", "O", "--per-class", "3", "--cfg-scale", "2.5"],
     {"per_class": 3, "cfg_scale": 2.5}, {"--per-class": "--per_class", "--cfg-scale": "--cfg_scale"}),
    ("sample-c2i", "adatok sample-c2i --generator ar",
     ["--generator", "ar", "--model", "M", "--per-class", "3", "--num-steps", "4"],
     {"per_class": 3, "num_steps": 4}, {"--per-class": "--per_class", "--num-steps": "--num_steps"}),
    ("sample-t2i", "adatok sample-t2i",
     ["--model", "M", "--num-images", "2", "--cfg", "2.0", "--steps", "3", "--max-image-tokens", "4", "--steps", "3"],
     {"num_images": 2, "cfg_scale": 2.0, "num_steps": 3, "max_image_tokens": 4},
     {"--num-images": "--num_images", "--cfg": "--cfg_scale", "--steps": "--num_steps",
      "--max-image-tokens": "--max_image_tokens"}),
]


@pytest.mark.parametrize("verb,prog,argv,values,old", OLD_SPELLINGS, ids=[p for _, p, _, _, _ in OLD_SPELLINGS])
def test_each_old_spelling_still_works_with_one_deprecation_line(verb, prog, argv, values, old, monkeypatch, capsys):
    """For one release the old spellings parse to the same options, each printing one line on stderr (once,
    however often it is given)."""
    from adatok_vlm.training.flags import deprecation_line

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def stop(self, *args, **kwargs):
        raise Parsed(original(self, *args, **kwargs))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(Parsed) as parsed:
        cli.main([verb, *argv])
    ns = parsed.value.args[0]
    assert {k: getattr(ns, k) for k in values} == values
    err = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert sorted(err) == sorted(deprecation_line(prog, a, b) for a, b in old.items())


def test_the_new_spellings_print_no_deprecation(monkeypatch, capsys):
    from adatok_vlm.sample_t2i import build_parser

    ns = build_parser().parse_args(["--model", "M", "--num_images", "2", "--cfg_scale", "2.0", "--num_steps", "3"])
    assert (ns.num_images, ns.cfg_scale, ns.num_steps) == (2, 2.0, 3)
    assert "deprecated" not in capsys.readouterr().err


def test_a_hyphenated_option_name_is_refused_at_build_time():
    from adatok_vlm.training.flags import FlagParser

    with pytest.raises(ValueError, match="--per_class"):
        FlagParser(prog="x").add_argument("--per-class")
