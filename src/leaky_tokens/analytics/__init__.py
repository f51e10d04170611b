"""Analytics service: the usage-event store, usage / report / anomaly queries."""
