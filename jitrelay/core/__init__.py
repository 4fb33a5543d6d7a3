"""The pure core: the wire format, the domains, configuration files, framing. No I/O; imports numpy only."""
