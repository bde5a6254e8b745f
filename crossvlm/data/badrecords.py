"""Counting bad records across DataLoader workers and stopping a run when there are too many.

Workers return `BadRecord`s in place of samples; the collate function passes them up in the batch
(`batch["bad_records"]`), and a `BadRecordTracker` in the main process adds them up.
"""

from __future__ import annotations

from collections import Counter

from crossvlm.data.records import BAD_KINDS, BadRecord
from crossvlm.errors import DataError


class BadRecordTracker:
    """Counts samples seen and bad records by kind; raises DataError when their share is too high.

    The share is judged once `min_samples` records were seen (so one early bad record does not end a
    run), and at once when the bad count alone already exceeds `max_bad_fraction × expected_total`
    (the records of one epoch), since the share of that epoch can then no longer end under the limit.
    """

    def __init__(self, max_bad_fraction: float = 0.01, *, expected_total: int | None = None,
                 min_samples: int = 1000, max_examples: int = 3):
        self.max_bad_fraction = max_bad_fraction
        self.expected_total = expected_total
        self.min_samples = min_samples if expected_total is None else min(min_samples, expected_total)
        self.max_examples = max_examples
        self.seen = 0
        self.truncated = 0
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[BadRecord]] = {}

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    def add(self, record: BadRecord) -> None:
        self.seen += 1
        self.counts[record.kind] += 1
        examples = self.examples.setdefault(record.kind, [])
        if len(examples) < self.max_examples:
            examples.append(record)

    def add_good(self, n: int = 1, truncated: int = 0) -> None:
        self.seen += n
        self.truncated += truncated

    def update(self, batch: dict) -> None:
        """Count one collated batch, then check the share."""
        for record in batch.get("bad_records", ()):
            self.add(record)
        self.add_good(batch.get("num_samples", 0), batch.get("num_truncated", 0))
        self.check()

    def too_many(self) -> bool:
        if self.bad == 0:
            return False
        # Past the allowance of a whole epoch the share cannot end under the limit.
        if self.expected_total and self.bad > self.max_bad_fraction * max(self.expected_total, self.seen):
            return True
        return self.seen >= self.min_samples and self.bad > self.max_bad_fraction * self.seen

    def check(self) -> None:
        if self.too_many():
            raise DataError(
                f"too many bad records: {self.bad} of {self.seen} seen "
                f"({self.bad / max(self.seen, 1):.1%} > max_bad_fraction {self.max_bad_fraction:.1%}); "
                + self.report(one_line=True)
            )

    def report(self, one_line: bool = False) -> str:
        """Counts by kind with located examples; `one_line` joins it for an error message."""
        if not self.counts:
            lines = [f"no bad records in {self.seen} seen"]
        else:
            lines = [f"{self.bad} bad of {self.seen} seen ({self.bad / max(self.seen, 1):.2%})"]
            for kind, n in self.counts.most_common():
                lines.append(f"{kind}: {n} ({BAD_KINDS.get(kind, '')})")
                for ex in self.examples.get(kind, []):
                    lines.append(f"    at {ex.location}" + (f": {ex.detail}" if ex.detail else ""))
        if self.truncated:
            lines.append(f"truncated to max_length (kept): {self.truncated}")
        return " | ".join(s.strip() for s in lines) if one_line else "\n".join(lines)

    def state_dict(self) -> dict:
        return {
            "seen": self.seen, "truncated": self.truncated, "counts": dict(self.counts),
            "examples": {k: [[r.kind, r.location, r.detail] for r in v] for k, v in self.examples.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        self.truncated = int(state.get("truncated", 0))
        self.counts = Counter({k: int(v) for k, v in state["counts"].items()})
        self.examples = {k: [BadRecord(*r) for r in v] for k, v in state.get("examples", {}).items()}
