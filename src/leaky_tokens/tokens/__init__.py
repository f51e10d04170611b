"""Token service: quotas, leaky buckets, consumption, purchases."""
