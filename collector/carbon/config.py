"""``[carbon]``: grid carbon intensity (gCO2e/kWh), electricity price and facility overhead (PUE).

Intensity comes from one of: a constant (``intensity_g_per_kwh``), an hourly profile (``hourly_g_per_kwh``: 24
values for local hours 0-23 in ``timezone``, optionally ``monthly_g_per_kwh`` overriding it for some months), or a
CSV time series (``csv``: ``timestamp,g_per_kwh[,price_per_kwh]``). Price the same way (``price_per_kwh``,
``hourly_price_per_kwh``, ``monthly_price_per_kwh``, or the CSV's third column); with no price at all, no cost is
computed or exported (never a made-up 0).

Both the agent's and the aggregator's config carry this section; the same model validates both.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

HOURS = 24
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_CURRENCY = re.compile(r"[A-Za-z]{3}")


def _check_profile(values: list[float], what: str) -> list[float]:
    if len(values) != HOURS:
        raise ValueError(f"{what} has {len(values)} values; it needs {HOURS}, one per local hour 0-23")
    for hour, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what}: hour {hour} is {value!r}; values must be finite and 0 or more")
    return values


def _check_monthly(months: dict[str, list[float]], what: str) -> dict[str, list[float]]:
    checked = {}
    for name, values in months.items():
        month = name.lower()[:3]
        if month not in MONTHS or name.lower() not in (month, _full_month(month)):
            raise ValueError(f"{what}: {name!r} is not a month (use jan, feb, ... dec)")
        checked[month] = _check_profile(values, f"{what}.{name}")
    return checked


FULL_MONTHS = (
    "january", "february", "march", "april", "may", "june",
    "july", "august", "september", "october", "november", "december",
)  # fmt: skip


def _full_month(short: str) -> str:
    return FULL_MONTHS[MONTHS.index(short)]


class CarbonConfig(BaseModel):
    """``[carbon]``. Grams and prices are per kWh of facility energy: measured energy x ``pue``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    intensity_g_per_kwh: float = Field(400.0, ge=0, allow_inf_nan=False, description="constant intensity, gCO2e/kWh")
    hourly_g_per_kwh: list[float] | None = Field(None, description="24 values, local hours 0-23 in timezone")
    monthly_g_per_kwh: dict[str, list[float]] = Field(
        default_factory=dict, description="month (jan..dec) = 24 values; overrides hourly_g_per_kwh for that month"
    )
    csv: Path | None = Field(
        None, description="time series 'timestamp,g_per_kwh[,price_per_kwh]', re-read when it changes"
    )
    timezone: str = Field("UTC", description="IANA zone of the hourly profiles (DST applies)")
    pue: float = Field(1.0, ge=1.0, le=10.0, allow_inf_nan=False, description="facility energy / IT energy")
    currency: str = Field("EUR", description="ISO 4217 code of the prices")
    price_per_kwh: float | None = Field(None, ge=0, allow_inf_nan=False, description="constant price per kWh")
    hourly_price_per_kwh: list[float] | None = None
    monthly_price_per_kwh: dict[str, list[float]] = Field(default_factory=dict)
    csv_check_interval_s: float = Field(30.0, gt=0, le=86400, description="how often the CSV's mtime/size is checked")

    @property
    def price_keys(self) -> list[str]:
        """The price keys set here: a CSV with a price column must come without them (see ``read_csv``)."""
        given = {
            "price_per_kwh": self.price_per_kwh is not None,
            "hourly_price_per_kwh": self.hourly_price_per_kwh is not None,
            "monthly_price_per_kwh": bool(self.monthly_price_per_kwh),
        }
        return [key for key, is_set in given.items() if is_set]

    @field_validator("hourly_g_per_kwh", "hourly_price_per_kwh")
    @classmethod
    def _hourly(cls, value: list[float] | None) -> list[float] | None:
        return None if value is None else _check_profile(value, "the profile")

    @field_validator("monthly_g_per_kwh", "monthly_price_per_kwh")
    @classmethod
    def _monthly(cls, value: dict[str, list[float]]) -> dict[str, list[float]]:
        return _check_monthly(value, "the monthly profile")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (for example UTC, Europe/Berlin)") from None
        return value

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        if not _CURRENCY.fullmatch(value):
            raise ValueError(f"{value!r} is not a three-letter currency code (for example EUR, USD)")
        return value.upper()

    @model_validator(mode="after")
    def _one_intensity_source(self) -> CarbonConfig:
        if self.csv is not None and (self.hourly_g_per_kwh is not None or self.monthly_g_per_kwh):
            raise ValueError("set either csv or hourly_g_per_kwh/monthly_g_per_kwh, not both")
        # intensity_g_per_kwh has a default: only a value given explicitly conflicts (and would be ignored)
        if "intensity_g_per_kwh" in self.model_fields_set:
            other = (
                "csv"
                if self.csv is not None
                else "hourly_g_per_kwh"
                if self.hourly_g_per_kwh is not None
                else "monthly_g_per_kwh"
                if self.monthly_g_per_kwh
                else None
            )
            if other is not None:
                raise ValueError(
                    f"intensity_g_per_kwh and {other} are both set, and {other} would win: keep {other} for "
                    "intensity that changes over time, or intensity_g_per_kwh alone for a constant"
                )
        if self.price_per_kwh is not None and self.hourly_price_per_kwh is not None:
            raise ValueError(
                "price_per_kwh and hourly_price_per_kwh are both set, and hourly_price_per_kwh would win: keep "
                "hourly_price_per_kwh for a price by hour, or price_per_kwh alone for a constant"
            )
        if self.monthly_g_per_kwh and self.hourly_g_per_kwh is None and len(self.monthly_g_per_kwh) < len(MONTHS):
            missing = ", ".join(m for m in MONTHS if m not in self.monthly_g_per_kwh)
            raise ValueError(f"monthly_g_per_kwh lacks {missing}: give every month, or hourly_g_per_kwh for the rest")
        no_fallback = self.hourly_price_per_kwh is None and self.price_per_kwh is None
        if self.monthly_price_per_kwh and no_fallback and len(self.monthly_price_per_kwh) < len(MONTHS):
            missing = ", ".join(m for m in MONTHS if m not in self.monthly_price_per_kwh)
            raise ValueError(
                f"monthly_price_per_kwh lacks {missing}: give every month, or hourly_price_per_kwh or "
                "price_per_kwh for the rest"
            )
        return self
