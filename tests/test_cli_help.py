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
