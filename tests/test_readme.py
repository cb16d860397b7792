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
