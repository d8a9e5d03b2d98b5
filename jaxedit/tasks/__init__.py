"""Tasks: what differs between the sports and CounterFact experiments."""
