"""Usage as people and spreadsheets read it: times in and out as ISO 8601 UTC, rows as CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway.usage.ledger import TOTALS, group_fields


def hour_iso(hour: int) -> str:
    """`hour` (Unix seconds) as ISO 8601 UTC, e.g. "2026-12-03T19:00:00Z"."""
    return datetime.fromtimestamp(hour, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> int:
    """Unix seconds ("1764787200") or ISO 8601 ("2026-12-03T19:00:00Z", "2026-12-03" is that
    day's midnight) as Unix seconds; a time without a zone is UTC."""
    text = value.strip()
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{value!r} is not a time: give Unix seconds (1764787200) or ISO 8601 "
                         f"(2026-12-03T19:00:00Z, 2026-12-03)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def usage_csv(rows: list[dict], group_by: Sequence[str]) -> str:
    """`UsageLedger.query` rows as CSV with a header: the group fields, then the totals."""
    fields = group_fields(group_by)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*fields, *TOTALS])
    writer.writeheader()
    for row in rows:
        line = {name: row[name] for name in (*fields, *TOTALS)}
        if "hour" in line:
            line["hour"] = hour_iso(line["hour"])
        writer.writerow(line)
    return out.getvalue()
