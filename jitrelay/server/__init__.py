"""The relay process: sockets, buffers, fan-out, the journal, metrics and the lifecycle."""
