"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_states_the_two_commands_first():
    text = README.read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")


def test_readme_usage_example_runs(tmp_path, monkeypatch, capsys):
    block = python_blocks()[0]
    assert len([line for line in block.splitlines() if line.strip()]) <= 12
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace("/tmp/adatok-tiny", str(tmp_path / "adatok-tiny")), "README.md", "exec"), {})
    assert "torch.Size([4, 32, 16])" in capsys.readouterr().out


def test_every_standalone_readme_snippet_runs(tmp_path, monkeypatch):
    """Blocks that start with an import are complete programs; run each as written."""
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in python_blocks()[1:] if b.lstrip().startswith("import")]
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


# ---------------------------------------------------------------------------------------------
# every shell command's arguments parse (the work itself does not run)
# ---------------------------------------------------------------------------------------------
import argparse  # noqa: E402
import importlib  # noqa: E402
import runpy  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = README.parent
# The modules behind the `adatok` verbs and the `python -m` commands, imported before the parse so
# that every copy of the parsing functions they bound at import time can be intercepted.
ENTRY_MODULES = ("adatok_vlm.cli", "adatok_vlm.training.train_tokenizer", "adatok_vlm.training.train_policy",
                 "adatok_vlm.training.train_dit", "adatok_vlm.training.train_vlm",
                 "adatok_vlm.training.extract_tokens", "adatok_vlm.training.demo", "adatok_vlm.training.demo_dit",
                 "adatok_vlm.training.evaluate", "adatok_vlm.training.export", "adatok_vlm.sample_t2i",
                 "adatok_vlm.sample_c2i")
NOT_PYTHON = {"make", "sbatch", "pip", "."}      # commands that start no entry point of ours


class Parsed(BaseException):
    """Raised as soon as a command's arguments are parsed: the work after it never runs."""


def bash_commands() -> list[str]:
    """Every command of the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if shlex.split(line, comments=True):
                commands.append(line.strip())
    return commands


def entry_point(words: list[str]) -> tuple[str, str | None, list[str]] | None:
    """``(kind, target, args)`` for a command that runs our code: ("module", name, args),
    ("script", path, args) or ("adatok", None, args); None for the others (make, sbatch, pip)."""
    while words and re.match(r"^[A-Z_]+=", words[0]):        # VAR=value prefixes
        words = words[1:]
    head, rest = words[0], words[1:]
    if head in NOT_PYTHON:
        return None
    if head == "adatok":
        return "adatok", None, rest
    if head == "python":
        if rest[0] == "-m":
            return "module", rest[1], rest[2:]
        return "script", rest[0], rest[1:]
    if head in ("accelerate", "torchrun", "deepspeed"):      # launcher options, then the module and its args
        flag = "--module" if head == "deepspeed" else "-m"
        i = rest.index(flag)
        return "module", rest[i + 1], rest[i + 2:]
    return "unknown", head, rest


def _outermost(original, depth: list[int]):
    def wrapper(*args, **kwargs):
        depth[0] += 1
        try:
            result = original(*args, **kwargs)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            raise Parsed(result)
        return result
    return wrapper


def parse_only(monkeypatch, kind: str, target: str | None, args: list[str]) -> object:
    """Run a command up to (and including) its argument parsing: the first top-level
    ``ArgumentParser.parse_args`` or config ``fill_dataclass`` raises :class:`Parsed`; a rejected flag
    raises what the command raises (SystemExit from argparse, ValueError from the config)."""
    from adatok_vlm.training import config

    for name in ENTRY_MODULES:
        importlib.import_module(name)
    depth = [0]
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _outermost(argparse.ArgumentParser.parse_args, depth))
    for original in (config.fill_dataclass, config.parse_config):
        wrapper = _outermost(original, depth)
        for module in [m for n, m in sys.modules.items() if n.startswith("adatok_vlm")]:
            for attr, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, attr, wrapper)
    with pytest.raises(Parsed) as parsed:
        if kind == "adatok":
            from adatok_vlm import cli

            cli.main(args)
        elif kind == "module":
            importlib.import_module(target).main(args)
        else:
            source = (REPO / target).read_text(encoding="utf-8")
            assert "argparse" in source or "FlagParser" in source, \
                f"{target} has no argument parser: running it would do the work"
            monkeypatch.setattr(sys, "argv", [target, *args])
            runpy.run_path(str(REPO / target), run_name="__main__")
    return parsed.value.args[0] if parsed.value.args else None


def test_readme_commands_use_the_activated_venv():
    """One convention: `. .venv/bin/activate` once, then bare `python` / `adatok` / `pip`."""
    text = README.read_text(encoding="utf-8")
    assert ". .venv/bin/activate" in text
    offenders = [c for c in bash_commands() if ".venv/bin/" in c]
    assert not offenders, offenders


def inline_commands() -> list[str]:
    """Commands quoted in the prose (`python benchmarks/curves.py --model DIR --out DIR`): our scripts
    and modules only (not pytest), and not the elided ones (``...``)."""
    spans = re.findall(r"`((?:python|adatok) [^`]+)`", README.read_text(encoding="utf-8"))
    return [c for c in spans if "..." not in c and not c.startswith("python -m pytest")
            and any(w.startswith("--") and w != "--help" for w in c.split())]   # a name alone is no command


COMMANDS = [c for c in bash_commands() + inline_commands() if entry_point(shlex.split(c, comments=True))]


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=[c[:60] for c in COMMANDS])
def test_readme_command_arguments_parse(command, tmp_path, monkeypatch):
    """Each README command's flags are accepted by the command, as written (outputs/ is redirected to
    a temporary folder, where the files an earlier README step would have written are stubbed)."""
    monkeypatch.chdir(REPO)
    kind, target, args = entry_point(shlex.split(command, comments=True))
    assert kind != "unknown", (f"README command {command!r}: not a command this test knows (use `python`, "
                               "`adatok`, a launcher with -m, make, sbatch or pip)")
    args = [str(tmp_path / a) if a.startswith("outputs/") else a for a in args]
    (tmp_path / "outputs" / "demo-fmnist" / "model").mkdir(parents=True)
    (tmp_path / "outputs" / "demo-fmnist" / "model" / "config.json").write_text("{}")   # demo_dit checks it exists
    parse_only(monkeypatch, kind, target, args)


def test_a_rejected_flag_fails_the_parse(monkeypatch):
    """The check above can fail: the flag `adatok --help` used to show for extract-tokens is refused."""
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match="out"):
        parse_only(monkeypatch, "adatok", None, ["extract-tokens", "--tokenizer", "x", "--out", "y"])
    with pytest.raises(SystemExit):
        parse_only(monkeypatch, "adatok", None, ["evaluate", "--model", "x", "--data", "y", "--out", "z", "--nope", "1"])


def test_adatok_help_shows_only_flags_the_verbs_accept(monkeypatch, capsys):
    """Every usage line of `adatok --help` parses (placeholders filled in) through its verb."""
    from adatok_vlm import cli

    cli.main(["--help"])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("adatok ")]
    assert len(lines) >= 10
    monkeypatch.chdir(REPO)
    for line in lines:
        usage = re.sub(r"\s+\(.*\)$", "", line).replace("[", "").replace("]", "").replace("...", "")
        words = [w for w in shlex.split(usage)[1:] if w != "overrides"]
        words = ["2" if w == "N" else w.split("|")[0] for w in words]   # N: a count; a|b: the first choice
        parse_only(monkeypatch, "adatok", None, words)


# ---------------------------------------------------------------------------------------------
# every results table matches the file it cites
# ---------------------------------------------------------------------------------------------
from decimal import ROUND_HALF_UP, Decimal  # noqa: E402

SOURCE = re.compile(r"^<!-- from (.+?) -->$")
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")


def readme_tables() -> list[tuple[int, str | None, list[list[str]]]]:
    """``(line, source comment or None, rows of cells)`` for every markdown table in the README; the
    source is the ``<!-- from ... -->`` comment on the line right above the table."""
    lines = README.read_text(encoding="utf-8").splitlines()
    tables, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|\s*:?-{3}", lines[i + 1]):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            match = SOURCE.match(lines[i - 1].strip()) if i else None
            rows = [[c.strip() for c in row.strip().strip("|").split("|")] for k, row in enumerate(lines[i:j]) if k != 1]
            tables.append((i + 1, match.group(1) if match else None, rows))
            i = j
        else:
            i += 1
    return tables


def numbers(text: str) -> list[str]:
    return [n.replace(",", "") for n in NUMBER.findall(text)]


def shown_as(value: str, printed: str) -> bool:
    """Whether the number ``value`` (a file's, any precision) prints as ``printed`` (the README's)."""
    places = Decimal(1).scaleb(-len(printed.split(".")[1])) if "." in printed else Decimal(1)
    return Decimal(value).quantize(places, rounding=ROUND_HALF_UP) == Decimal(printed)


def result_tables():
    return [(line, source, rows) for line, source, rows in readme_tables() if source and not source.startswith("code:")]


def test_every_readme_table_with_figures_names_its_source():
    """A table holding a decimal figure must say where it comes from (a results file, or the code)."""
    missing = [line for line, source, rows in readme_tables()
               if source is None and any(re.search(r"\d\.\d", cell) for row in rows[1:] for cell in row[1:])]
    assert not missing, f"README tables without a <!-- from benchmarks/results/FILE --> comment at lines {missing}"
    assert len(result_tables()) >= 3


@pytest.mark.parametrize("line,source,rows", result_tables(), ids=[f"line{t[0]}" for t in result_tables()])
def test_readme_results_table_matches_its_files(line, source, rows):
    """Every figure of the table (all columns but the first, which names the row) is one of the cited
    files' numbers as the README prints it; the files are committed under benchmarks/results/."""
    paths = [REPO / p.strip() for p in source.split(",")]
    for path in paths:
        assert path.is_file() and path.parent == REPO / "benchmarks" / "results", path
    available = [n for path in paths for n in numbers(path.read_text(encoding="utf-8"))]
    for row in rows:
        for cell in row[1:]:
            for printed in numbers(cell):
                assert any(shown_as(v, printed) for v in available), (
                    f"README line {line}: {printed} (in {cell!r}) is in none of {source}")


def test_a_changed_figure_fails_the_table_check():
    """The check above can fail: a figure off by one in its last printed digit is not found."""
    line, source, rows = next(t for t in result_tables() if "demo_ablation.md" in t[1])
    rows = [row[:] for row in rows]
    rows[1][3] = "-0.3124"                                   # the fixed row's continuous reward is -0.3123
    with pytest.raises(AssertionError, match="-0.3124"):
        test_readme_results_table_matches_its_files(line, source, rows)


def test_readme_preset_sizes_are_the_code_s():
    """The presets table's trainable-parameter counts and the frozen VAE's size, counted from
    ``AdaTokConfig.from_preset`` on the meta device (no weights are allocated)."""
    import torch

    from adatok_vlm import AdaTokConfig, AdaTokModel

    line, source, rows = next(t for t in readme_tables() if t[1] and t[1].startswith("code: AdaTokConfig.from_preset"))
    header = rows[0]
    column = header.index("trainable params")
    for row in rows[1:]:
        name = row[0].strip("`")
        extra = {} if name == "adatok-tiny" else {"vae_random_init": True}
        with torch.device("meta"):
            model = AdaTokModel(AdaTokConfig.from_preset(name, **extra))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        printed = numbers(row[column])[0]
        assert shown_as(str(trainable / 1e6), printed), f"{name}: README {printed}M, code {trainable / 1e6:.2f}M"
        if frozen:
            vae = re.search(r"Counts exclude the frozen VAE \((\d+\.\d)M\)", README.read_text(encoding="utf-8"))
            assert vae and shown_as(str(frozen / 1e6), vae.group(1)), f"{name}: frozen VAE {frozen / 1e6:.1f}M"
