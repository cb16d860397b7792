"""`make bench`: run every benchmark that needs no trained model, writing JSON + markdown to outputs/bench/
(`zero_memory.py` launches its own processes and is run by hand), and exit non-zero when a script fails
*or* any of its checks is false (a benchmark that runs but misses its target is a failure, not "written").

The Table-2 ablation needs a trained tokenizer with a policy and runs when `outputs/demo-fmnist/model` exists:
    python benchmarks/ablation.py --model outputs/demo-fmnist/model --out outputs/bench/ablation.json
"""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = Path("outputs/bench")


def false_checks(result: dict) -> list[str]:
    """The names of the boolean checks a benchmark's JSON reports as false: its ``checks`` and ``targets``
    dicts (non-boolean entries there are measurements, not checks) and a top-level ``target_met``."""
    failed = []
    for key in ("checks", "targets"):
        failed += [f"{key}.{name}" for name, ok in (result.get(key) or {}).items() if ok is False]
    if result.get("target_met") is False:
        failed.append("target_met")
    return failed


def run(name: str, argv: list[str], out: Path) -> list[str]:
    """Run one benchmark script; the reasons it failed (empty when it ran and every check holds)."""
    print(f"== {name}", flush=True)
    if subprocess.run([sys.executable, str(HERE / f"{name}.py"), *argv, "--out", str(out)]).returncode:
        return [f"{name}: exited non-zero"]
    if not out.is_file():
        return [f"{name}: wrote no {out}"]
    return [f"{name}: {check} is false" for check in false_checks(json.loads(out.read_text(encoding="utf-8")))]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    failures = []
    for name in ("dit_varlen", "ar_generation", "ata_cost"):
        failures += run(name, [], OUT / f"{name}.json")
    if Path("outputs/demo-fmnist/model").is_dir():
        failures += run("ablation", ["--model", "outputs/demo-fmnist/model"], OUT / "ablation.json")
    else:
        print("(no outputs/demo-fmnist/model: the Table 2 ablation is skipped; `make demo-fmnist` trains it)")
    if failures:
        print(f"benchmarks written to {OUT}/, but {len(failures)} failed:")
        for failure in failures:
            print(f"  FAIL {failure}")
        return 1
    print(f"all benchmarks written to {OUT}/ and every check holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
