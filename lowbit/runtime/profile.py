"""Per-node timings of a session: :class:`Profile` rows and a fixed-width table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProfileRow:
    """One node: best-of-repeat time ``ms``, throughput ``gops = ops / (ms * 1e6)``, ``share`` of the total in %."""

    name: str
    op: str
    precision: str
    ms: float
    gops: float
    share: float
    note: str


@dataclass(frozen=True)
class Profile:
    """Rows in execution order; ``total_ms`` is the sum of the rows' best times."""

    rows: list[ProfileRow]
    total_ms: float

    @classmethod
    def from_timings(cls, entries: list[tuple[str, str, str, float, int, str]]) -> Profile:
        """Rows from ``(name, op, precision, seconds, ops, note)`` per node."""
        total = sum(e[3] for e in entries)
        rows = [ProfileRow(name, op, precision, 1e3 * sec, ops / sec / 1e9 if sec > 0 else 0.0,
                           100.0 * sec / total if total > 0 else 0.0, note)
                for name, op, precision, sec, ops, note in entries]
        return cls(rows, 1e3 * total)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [4])
        ops = max([len(r.op) for r in self.rows] + [2])
        head = f"{'node':<{width}}  {'op':<{ops}}  {'precision':<9}  {'ms':>9}  {'GOPS':>8}  {'share':>6}  note"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name:<{width}}  {r.op:<{ops}}  {r.precision:<9}  {r.ms:>9.3f}  {r.gops:>8.2f}  "
                         f"{r.share:>5.1f}%  {r.note}".rstrip())
        lines.append("-" * len(head))
        lines.append(f"{'total':<{width}}  {'':<{ops}}  {'':<9}  {self.total_ms:>9.3f}  {'':>8}  {100.0:>5.1f}%")
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: how many nodes ran in each precision, and how many quantized ones ran in float instead
        (their notes say why: a float kernel, or the whole float twin, was faster at these shapes)."""
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.precision] = counts.get(r.precision, 0) + 1
        ran = ", ".join(f"{n} {p}" for p, n in sorted(counts.items(), key=lambda item: -item[1]))
        if any("fell back to float: the quantized graph" in r.note for r in self.rows):
            tail = "; the float twin of a quantized graph ran, faster at these shapes (see the notes)"
        else:
            fell_back = sum("fell back to float" in r.note for r in self.rows)
            tail = f"; {fell_back} quantized nodes fell back to float kernels, faster at these shapes (see their " \
                   f"notes)" if fell_back else ""
        return f"ran: {ran}{tail}"
