"""``RequestMetrics.finished_many`` (the engine's batched form) renders what ``finished`` one by one does."""

from __future__ import annotations

import numpy as np
import pytest

from collector.aggregator.request_metrics import RequestMetrics
from collector.exporters.exposition import TextRenderer


@pytest.mark.parametrize("models, tenants", [(5, 4), (1, 1), (1, 3)])
def test_finished_many_is_finished_one_by_one_label_caps_and_no_samples_included(models: int, tenants: int) -> None:
    rng = np.random.default_rng(3)
    n = 500
    model = [f"m{int(i)}" for i in rng.integers(0, models, n)]
    tenant = [f"t{int(i)}" for i in rng.integers(0, tenants, n)]
    # energies over every histogram bucket, on the bounds too; NaN: no samples
    active = np.concatenate([rng.choice([1.0, 2.5, 1e5, 0.5, 2e5], 50), rng.lognormal(3, 3, n - 50)])
    active[rng.integers(0, n, 40)] = np.nan
    full = active * 1.3
    tokens = rng.integers(0, 1000, n)
    one, many = RequestMetrics(max_label_values=3), RequestMetrics(max_label_values=3)
    for i in range(n):
        a, f = (None, None) if np.isnan(active[i]) else (float(active[i]), float(full[i]))
        one.finished(model[i], tenant[i], a, f, int(tokens[i]))
    many.finished_many(model[:200], tenant[:200], active[:200], full[:200], tokens[:200])
    many.finished_many(model[200:], tenant[200:], active[200:], full[200:], tokens[200:])
    expected = TextRenderer().render(one.families()).decode()
    got = TextRenderer().render(many.families()).decode()
    assert ('model="other"' in expected) == (models > 3) and "wattmeter_requests_no_samples_total 0" not in expected
    want = _values(expected)
    assert _values(got) == pytest.approx(want, rel=1e-12)  # sums: in another order
    assert len(want) > 20


def _values(text: str) -> dict[str, float]:
    """Sample (name and labels) -> value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
