"""The one flag style of the ``adatok`` verbs, for the entry points that parse with ``argparse``.

The trainers read ``--section.field VALUE`` and ``--output_dir`` (:mod:`adatok_vlm.training.config`): names
with underscores. :class:`FlagParser` gives the argparse programs (the samplers, ``evaluate``, ...) the same
spelling: every ``--long_option`` is written with underscores, and for one release the old hyphenated
spelling (``--per-class`` for ``--per_class``) and any renamed flag (``renamed={"--cfg": "--cfg_scale"}``)
still work, each printing one deprecation line on stderr. ``--help`` lists the options, then the old
spellings it still accepts.
"""

from __future__ import annotations

import argparse
import sys


def deprecation_line(prog: str, old: str, new: str) -> str:
    """The one line printed for an old spelling (tests match it)."""
    return f"{prog}: {old} is deprecated and goes in the next release; use {new}"


class FlagParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose long options are spelt ``--like_this``, accepting the old
    ``--like-this`` (and the ``renamed`` spellings) with one deprecation line on stderr per old flag used.

    Args:
        renamed: ``{"--old": "--new"}`` for flags whose name changed, not only its hyphens.
        (the rest as ``argparse.ArgumentParser``)
    """

    def __init__(self, *args, renamed: dict[str, str] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._renamed = dict(renamed or {})

    def add_argument(self, *names, **kwargs):
        for name in names:
            if name.startswith("--") and "-" in name[2:]:
                raise ValueError(f"{self.prog}: option {name!r} must be spelt with underscores "
                                 f"({'--' + name[2:].replace('-', '_')}); the hyphenated spelling is its alias")
        return super().add_argument(*names, **kwargs)

    def old_spellings(self) -> dict[str, str]:
        """``{old: new}``: every hyphenated spelling of an underscored option, plus ``renamed``."""
        old = {}
        for action in self._actions:
            for name in action.option_strings:
                if name.startswith("--") and "_" in name[2:]:
                    old["--" + name[2:].replace("_", "-")] = name
        for before, after in self._renamed.items():
            if after not in self._option_string_actions:
                raise ValueError(f"{self.prog}: renamed flag {before!r} points to {after!r}, which is no option")
            old[before] = after
        return old

    def format_help(self) -> str:
        text = super().format_help()
        old = self.old_spellings()
        if old:
            pairs = ", ".join(f"{a} -> {b}" for a, b in sorted(old.items()))
            text += f"\ndeprecated spellings, accepted for one more release: {pairs}\n"
        return text

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        old = self.old_spellings()
        rewritten, warned = [], set()
        for arg in args:
            if arg == "--":
                rewritten.extend(args[len(rewritten):])
                break
            name, eq, value = arg.partition("=")
            if name in old and name not in self._option_string_actions:
                if name not in warned:
                    print(deprecation_line(self.prog, name, old[name]), file=sys.stderr)
                    warned.add(name)
                arg = old[name] + eq + value
            rewritten.append(arg)
        return super().parse_known_args(rewritten, namespace)


__all__ = ["FlagParser", "deprecation_line"]
