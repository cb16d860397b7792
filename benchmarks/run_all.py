"""`make bench`: run every benchmark that needs no trained model, writing JSON + markdown to outputs/bench/
(`zero_memory.py` launches its own processes and is run by hand).

The Table-2 ablation needs a trained tokenizer with a policy:
    python benchmarks/ablation.py --model outputs/demo/model --out outputs/bench/ablation.json
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = Path("outputs/bench")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in ("dit_varlen", "ar_generation", "ata_cost"):
        print(f"== {name}")
        result = subprocess.run([sys.executable, str(HERE / f"{name}.py"), "--out", str(OUT / f"{name}.json")])
        if result.returncode:
            failed.append(name)
    if Path("outputs/demo/model").is_dir():
        print("== ablation (outputs/demo/model)")
        result = subprocess.run([sys.executable, str(HERE / "ablation.py"), "--model", "outputs/demo/model",
                                 "--out", str(OUT / "ablation.json")])
        if result.returncode:
            failed.append("ablation")
    print("failed: " + ", ".join(failed) if failed else f"all benchmarks written to {OUT}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
