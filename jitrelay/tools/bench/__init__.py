"""``jitrelay bench``: the relay against the raw-bytes forwarder, pyzmq and the NATS bridge, on every workload.

The package, one job a module:

- ``command``: the command line (``add_arguments``) and the run of it (``run``);
- ``options``: what to run, and the only home of the defaults;
- ``workloads``: the table of workloads (W1, W2, W1f, W3, fanout, client, records):
  what each runs and how it is reported;
- ``runs``: one run of one relay workload against one relay kind, and the
  startup timing;
- ``relays``: the relays and baselines as child processes;
- ``workers``, ``receive``, ``fanout``: the publisher and subscriber processes;
- ``messages``: the messages the workloads send;
- ``figures``: the measured values, and their ratios;
- ``report``: the printed report, pure functions of the figures;
- ``clients``: the ``client`` workload;
- ``records``: the ``records`` workload;
- ``raw_forwarder``, ``zmq_proxy``: the baselines, run as their own processes.

``add_arguments`` and ``run`` import the rest only when called, so that the
baselines, started as ``python -m jitrelay.tools.bench.raw_forwarder``, load
nothing else.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``jitrelay bench`` options (``command.add_arguments``)."""
    from jitrelay.tools.bench import command

    command.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Carry out a ``jitrelay bench`` command line (``command.run``): 0, 1 if a run failed, 130 on Ctrl-C.

    Raises ``UsageError`` for a command line that cannot run.
    """
    from jitrelay.tools.bench import command

    return command.run(args)
