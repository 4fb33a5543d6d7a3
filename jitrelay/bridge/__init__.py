"""A domain's relays on several hosts joined through a NATS cluster."""
