#!/usr/bin/env python3
"""Lines of each algorithm file, split into method code, config and tests (docs/architecture.md).

Counts non-blank lines that are not comments. "config" is every top-level item about the YAML
config (the `*Config` structs, their `Default` and `AlgorithmConfig` impls); "inline tests" is
the `#[cfg(test)]` module; "method" is the rest (the update rule and its helpers). "trainer
tests" counts sequel-algos/tests/algos/<algo>.rs, the trainer-driven tests of the file.

Usage: scripts/algo_lines.py [FILE...]   (default: the algorithms of sequel-algos/src)
"""
import re
import sys
from pathlib import Path

ALGOS = ["naive", "joint", "ewc", "ewc_online", "si", "rwalk", "mas", "lwf", "lwf_mc", "er",
         "agem", "gem", "der", "xder", "er_ace", "er_aml", "mir", "cls_er", "bic", "lucir", "icarl", "gdumb"]


def items(lines):
    """Top-level items as (header line, [lines]) by brace depth, attributes and docs attached."""
    out, cur, depth = [], [], 0
    for line in lines:
        cur.append(line)
        depth += line.count("{") - line.count("}")
        stripped = line.strip()
        if depth == 0 and (stripped.endswith("}") or stripped.endswith(";")):
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def code(lines):
    return sum(1 for l in lines if l.strip() and not l.strip().startswith("//"))


def count(path):
    text = Path(path).read_text().splitlines()
    cut = next((i for i, l in enumerate(text) if l.startswith("#[cfg(test)]")), len(text))
    body, tests = text[:cut], text[cut:]
    config = method = 0
    for it in items(body):
        header = next((l for l in it if re.match(r"\s*(pub(\(crate\))? )?(struct|impl|fn|enum|const|use|mod|type)\b", l)), "")
        n = code(it)
        if "Config" in header and ("struct" in header or "impl" in header):
            config += n
        else:
            method += n
    return method, config, code(tests)


def main():
    files = sys.argv[1:] or [f"sequel-algos/src/{a}.rs" for a in ALGOS]
    print("| file | method code | config | inline tests | trainer tests (`tests/algos/`) |")
    print("|---|---|---|---|---|")
    for f in files:
        m, c, t = count(f)
        ext = Path(f).parent.parent / "tests" / "algos" / Path(f).name
        e = code(ext.read_text().splitlines()) if ext.exists() else 0
        print(f"| `{Path(f).name}` | {m} | {c} | {t} | {e} |")


if __name__ == "__main__":
    main()
