"""Carbon and cost: grid intensity and price over time (``[carbon]``), energy integrated against them, and the
metrics that export the result."""

from collector.carbon.config import CarbonConfig
from collector.carbon.series import CarbonSeriesSource, Footprint, IntensitySeries, Segment, series_from_config

__all__ = ["CarbonConfig", "CarbonSeriesSource", "Footprint", "IntensitySeries", "Segment", "series_from_config"]
