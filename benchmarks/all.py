"""Run every benchmark and write benchmarks/results/RESULTS.md (+ one JSON per benchmark).

    python -m benchmarks.all
"""

from __future__ import annotations

from benchmarks import codec, pipe
from benchmarks.common import RESULTS, machine, record


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    sections = []
    for name, module, what in (
        ("codec", codec, "Cap'n Proto encode/decode of a parameter chunk vs numpy memcpy and pickle"),
        ("pipe", pipe, "transport: Pangea's acknowledged JetStream path vs the nats-py core publish->subscribe ceiling"),
    ):
        print(f"== {name}")
        rows = module.run()
        record(name, rows)
        sections.append(f"### {name}: {what}\n\n{_table(rows)}\n")
    text = f"Machine: {machine()}\n\n" + "\n".join(sections)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "RESULTS.md").write_text(text)
    print(f"wrote {RESULTS / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
