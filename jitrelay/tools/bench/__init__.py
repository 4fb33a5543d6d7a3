"""``jitrelay bench``: the relay against the raw-bytes forwarder and pyzmq, on the workloads W1 and W2."""
