"""`wattmeter report`: energy, emissions and cost from the aggregator's store, with the shift advisor."""
