"""The soak's controller: it starts the relay and the clients, churns them, samples memory, and gathers the figures.

Clients are forked from a ``multiprocessing`` forkserver that has the
workers loaded, so churning costs milliseconds, not an interpreter start.
Each counts into its ``Counters`` in shared memory, which stay readable after
a SIGKILL, and writes failure details to one file in the run folder.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from jitrelay.core import protocol
from jitrelay.core.domains import logic_for
from jitrelay.core.units import MiB
from jitrelay.testing.procfs import proc_status
from jitrelay.testing.relay import ProcessFailed, RelayProcess
from jitrelay.tools.soak.counters import ENDING, STOPPING, Client, Counters, failures
from jitrelay.tools.soak.options import SoakOptions
from jitrelay.tools.soak.relay import Echo, SoakError, relay_options
from jitrelay.tools.soak.report import RunFigures, build_report
from jitrelay.tools.soak.verify import MAX_DETAILS, GapCheck, WitnessRecord, check_gaps
from jitrelay.tools.soak.workers import STALL_MIN, ClientConfig, SubscriberRole, client_main, pick_sources

READY_TIMEOUT = 60.0  # a relay on a fresh checkout compiles its kernels first
ATTACH_TIMEOUT = 30.0
RSS_INTERVAL = 0.5
PROGRESS_INTERVAL = 10.0
QUIET_SECONDS = 1.0  # after the publishers end, subscribers idle this long have everything
DRAIN_TIMEOUT = 30.0
STARTS_PER_SOURCE = 256  # the flags byte of a stream key


class Soak:
    """One soak run: the relay, the clients, the churn, the memory samples, the report."""

    def __init__(self, opts: SoakOptions):
        self.opts = opts
        self.seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1 << 32)
        self.rng = random.Random(self.seed)
        self.logic = logic_for(opts.domain)
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["jitrelay.tools.soak.workers", "jitrelay.client"])
        # The phase, then each publisher slot's source: slot i starts on source i + 1.
        self.ctrl = self.ctx.RawArray("q", 1 + opts.publishers)
        self.ctrl[1:] = list(range(1, 1 + opts.publishers))
        self.clients: list[Client] = []
        self._indexes = itertools.count()
        self._starts: Counter[int] = Counter()  # publisher starts per source byte
        self.echo: Echo | None = None
        self.stopped: dict[int, tuple[Client, float, float]] = {}  # SIGSTOPped: pid -> (client, since, until)
        self.keys_path: Path | None = None
        self.t0 = 0.0
        self.own_dir = opts.socket_dir is None
        self.run_dir = opts.socket_dir or Path(tempfile.mkdtemp(prefix="jitrelay-soak-", dir="/tmp"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = ClientConfig(
            socket_path=str(self.run_dir / f"{opts.domain}.sock"),
            domain=opts.domain,
            domain_id=self.logic.domain_id,
            max_payload=self.logic.max_payload,
            publisher_rate=opts.rate / opts.publishers,
            max_size=min(opts.max_size, protocol.HEADER_SIZE + self.logic.max_payload),
            stall_prob=opts.stall_prob,
            stall_max=opts.stall_max,
            resubscribe_prob=opts.resubscribe,
        )
        self.relay_options = relay_options(self.logic.slow_policy, opts.log_size)
        self.figures = RunFigures(
            opts, self.seed, self.config.max_size, self.relay_options, self.clients, detail_lines={}, gap_checks={}
        )
        self.relay: RelayProcess | None = None

    # clients

    def spawn(
        self,
        kind: str,
        *,
        slot: int = -1,
        from_start: bool = False,
        witness: bool = False,
        resume: tuple[str, dict[int, int]] | None = None,
        shm: bool | None = None,
    ) -> Client:
        """Start a publisher in ``slot``, or a subscriber (see ``_subscriber``); raises ``SoakError`` out of keys."""
        index = next(self._indexes)
        stats = self.ctx.RawValue(Counters)
        client = Client(
            kind=kind, index=index, proc=None, stats=stats, detail_path=self.run_dir / f"{kind}-{index}.jsonl"
        )
        arg: int | SubscriberRole
        if kind == "pub":
            client.key = arg = self._stream_key(slot)
            client.slot = slot
        else:
            arg = self._subscriber(client, from_start=from_start, witness=witness, resume=resume, shm=shm)
        seed = (self.seed * 1_000_003 + index) % (1 << 63)
        client.proc = self.ctx.Process(
            target=client_main,
            args=(kind, self.config, stats, self.ctrl, str(client.detail_path), seed, arg),
            name=f"soak-{kind}-{index}",
            daemon=True,
        )
        client.proc.start()
        self.clients.append(client)
        return client

    def _subscriber(
        self,
        client: Client,
        *,
        from_start: bool,
        witness: bool,
        resume: tuple[str, dict[int, int]] | None,
        shm: bool | None,
    ) -> SubscriberRole:
        """Draw a subscriber's role: the witness and a ``--resuming`` share of the others ask for positions
        (unfiltered), the rest are filtered at connect by the ``--filtered`` share; a ``--shm`` share of them
        (the witness aside) reads the log from shared memory. ``resume`` starts a positioned one where a killed
        one left off; ``shm`` says how it reads (a successor reads as the one it replaces)."""
        name = f"{client.kind}-{client.index}"
        positioned = witness or resume is not None or self.rng.random() < self.opts.resuming
        filtered = not witness and not positioned and self.rng.random() < self.opts.filtered
        sources = pick_sources(self.rng, self.ctrl[1:]) if filtered else None
        if shm is None:
            shm = not witness and bool(self.opts.shm) and self.rng.random() < self.opts.shm
        if positioned:
            client.gaps_path = self.run_dir / f"{name}.gaps.jsonl"
            client.state_path = None if witness else self.run_dir / f"{name}.position.json"
        if witness:
            self.keys_path = self.run_dir / "witness-keys.bin"
        client.from_start, client.witness, client.filtered, client.positioned = (
            from_start,
            witness,
            filtered,
            positioned,
        )
        client.resumed, client.shm = resume is not None, bool(shm)
        return SubscriberRole(
            client.index,
            from_start=from_start,
            witness=witness,
            sources=sources,
            positioned=positioned,
            resume=resume,
            state_path=str(client.state_path or ""),
            gaps_path=str(client.gaps_path or ""),
            keys_path=str(self.keys_path) if witness else "",
            shm=shm,
        )

    def _stream_key(self, slot: int) -> int:
        """A new stream for ``slot``: its source byte, unless that has had its 256 starts, and the next flags."""
        source = self.ctrl[1 + slot]
        if self._starts[source] >= STARTS_PER_SOURCE:
            held = set(self.ctrl[1:])
            free = [s for s in range(1, 256) if s not in held and self._starts[s] < STARTS_PER_SOURCE]
            if not free:
                raise SoakError(f"ran out of stream keys after {sum(self._starts.values())} publisher starts")
            source = min(free, key=lambda s: (self._starts[s], s))
            self.ctrl[1 + slot] = source
        flags = self._starts[source]
        self._starts[source] += 1
        return source | flags << 8

    def live(self, kind: str | None = None) -> list[Client]:
        """The clients running now, of ``kind`` if given."""
        return [c for c in self.clients if not c.killed and c.proc.is_alive() and kind in (None, c.kind)]

    def kill_one(self) -> None:
        """SIGKILL a client other than the witness, and start its successor (resumed where it recorded, if it did)."""
        victims = [c for c in self.live() if not c.witness]
        if not victims:
            return
        victim = self.rng.choice(victims)
        victim.proc.kill()
        victim.proc.join(2)
        victim.killed = True
        self.figures.kills[victim.kind] += 1
        if victim.pid in self.stopped:
            self._account_stop(self.stopped.pop(victim.pid)[1], time.monotonic())
        resume = None
        if victim.positioned and victim.state_path is not None:
            try:
                state = json.loads(victim.state_path.read_text())
            except (OSError, ValueError):
                self.figures.unrecorded += 1  # killed before its first record: its successor starts afresh
            else:
                resume = (state["position"], {int(k): v for k, v in state["last"].items()})
                self.figures.resumes += 1
        self.spawn(victim.kind, slot=victim.slot, resume=resume, shm=victim.shm)

    def sigstop_one(self, now: float) -> None:
        """Stop a subscriber other than the witness with SIGSTOP, to be continued with SIGCONT a while later."""
        victims = [c for c in self.live("sub") if not c.witness and c.pid not in self.stopped]
        if not victims:
            return
        victim = self.rng.choice(victims)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGSTOP)
            until = now + self.rng.uniform(STALL_MIN, max(STALL_MIN, self.opts.stall_max))
            self.stopped[victim.pid] = (victim, now, until)
            self.figures.sigstops += 1
            self.figures.sigstopped["shm" if victim.shm else "socket"] += 1

    def continue_stopped(self, now: float, every: bool = False) -> None:
        """SIGCONT the stopped subscribers whose time is up (``every``: all of them)."""
        for pid, (_, since, until) in list(self.stopped.items()):
            if every or now >= until:
                del self.stopped[pid]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                self._account_stop(since, now)

    def _account_stop(self, since: float, now: float) -> None:
        self.figures.sigstop_seconds += now - since

    def replace_exited(self) -> None:
        """A client that ended on its own (dropped as slow, refused) gets a successor, as a killed one does."""
        for client in self.clients:
            if not client.killed and not client.replaced and client.proc.exitcode is not None:
                client.replaced = True
                self.figures.replaced[client.kind] += 1
                self.spawn(client.kind, slot=client.slot, shm=client.shm)

    # phases

    def attach_subscribers(self) -> None:
        """Start the subscribers and probe until each has a message: from then on it sees every publisher.

        Raises ``SoakError`` when one has not attached within ``ATTACH_TIMEOUT``, or the relay died.
        """
        assert self.relay is not None
        subs = [self.spawn("sub", from_start=True, witness=i == 0) for i in range(self.opts.subscribers)]
        tlv_type = protocol.DOMAIN_TLV_RANGES[self.logic.domain_id][0][0]
        deadline = time.monotonic() + ATTACH_TIMEOUT
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(self.config.socket_path)
            while not all(s.stats.probes for s in subs):  # no one else publishes yet: nothing comes back
                if time.monotonic() > deadline or not self.relay.alive():
                    states = ", ".join(f"sub-{s.index} {s.state}" for s in subs)
                    raise SoakError(f"subscribers did not attach within {ATTACH_TIMEOUT:.0f} s ({states})")
                probe = protocol.build_message(
                    self.logic.domain_id, [(tlv_type, b"probe")], sequence=self.figures.probes_sent
                )
                sock.sendall(probe)
                self.figures.probes_sent += 1
                time.sleep(0.02)
            sock.shutdown(socket.SHUT_WR)  # graceful: the relay reads every probe, then closes its side
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass

    def sample_rss(self) -> None:
        """Take one sample of the relay's resident memory, if it is running."""
        rss = proc_status(self.relay.pid, "VmRSS") if self.relay else None
        if rss is not None:
            self.figures.rss_samples.append((time.monotonic() - self.t0 if self.t0 else 0.0, rss))

    def load(self) -> None:
        """The timed part: publishers run, the churn kills and replaces clients, memory is sampled."""
        assert self.relay is not None
        opts = self.opts
        for slot in range(opts.publishers):
            self.spawn("pub", slot=slot)
        self.t0 = time.monotonic()
        end = self.t0 + opts.duration
        next_kill = self.t0 + self.rng.expovariate(opts.churn) if opts.churn > 0 else float("inf")
        next_stop = self.t0 + self.rng.expovariate(opts.sigstop) if opts.sigstop > 0 else float("inf")
        next_rss = self.t0
        next_progress = self.t0 + PROGRESS_INTERVAL
        try:
            while (now := time.monotonic()) < end:
                if not self.relay.alive():
                    return
                if now >= next_kill:
                    self.kill_one()
                    next_kill += self.rng.expovariate(opts.churn)
                if now >= next_stop:
                    self.sigstop_one(now)
                    next_stop += self.rng.expovariate(opts.sigstop)
                self.continue_stopped(now)
                self.replace_exited()
                if now >= next_rss:
                    self.sample_rss()
                    next_rss += RSS_INTERVAL
                if opts.progress and now >= next_progress:
                    next_progress += PROGRESS_INTERVAL
                    self.progress(now - self.t0)
                time.sleep(min(0.02, max(0.0, min(next_kill, next_rss, end) - time.monotonic())))
        except KeyboardInterrupt:
            self.figures.interrupted = True
        finally:
            self.figures.load_seconds = time.monotonic() - self.t0

    def progress(self, elapsed: float) -> None:
        """One progress line on stderr."""
        published = sum(c.stats.published for c in self.clients if c.kind == "pub")
        verified = sum(c.stats.verified for c in self.clients if c.kind == "sub")
        failed = sum(failures(c.stats) for c in self.clients if c.kind == "sub")
        samples = self.figures.rss_samples
        rss = samples[-1][1] / MiB if samples else float("nan")
        print(
            f"soak {elapsed:5.0f} s: published {published:,}, verified {verified:,}, failures {failed}, "
            f"killed {sum(self.figures.kills.values())}, relay RSS {rss:.1f} MiB",
            file=sys.stderr,
            flush=True,
        )

    def finish(self) -> int | None:
        """End the run in order: stalls end, publishers flush and close, subscribers drain, the relay stops."""
        assert self.relay is not None
        self.ctrl[0] = ENDING
        self.continue_stopped(time.monotonic(), every=True)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        for client in self.live("pub"):
            client.proc.join(max(0.0, deadline - time.monotonic()))
            _end_hung(client)
        # Subscribers have everything once none of them has verified anything for a while.
        last, quiet_since = None, time.monotonic()
        while time.monotonic() < deadline and self.relay.alive():
            now_counts = [c.stats.verified for c in self.live("sub")]
            if now_counts != last:
                last, quiet_since = now_counts, time.monotonic()
            elif time.monotonic() - quiet_since >= QUIET_SECONDS:
                break
            time.sleep(0.05)
        if self.echo is not None:
            self.echo.close()
        self.sample_rss()
        self.ctrl[0] = STOPPING
        code = self.relay.stop()
        for client in self.live("sub"):
            client.proc.join(10)
            _end_hung(client)  # it never saw the relay close its connection
        return code

    def run(self) -> dict:
        """Run the soak and return its report; raises ``SoakError`` when the relay or the clients would not start."""
        self.relay = RelayProcess(
            self.opts.domain,
            Path(self.config.socket_path),
            self.relay_options,
            summary_file=self.run_dir / "relay-figures.json",
            tie_to_parent=True,
            new_session=True,  # a Ctrl-C reaches the soak, which stops the relay itself
        )
        exit_code: int | None = None
        try:
            self.wait_for_relay()
            self.sample_rss()
            if self.opts.filtered or self.opts.resubscribe:
                self.echo = Echo(self.config)
            self.attach_subscribers()
            self.load()
            exit_code = self.finish()
        except KeyboardInterrupt:
            self.figures.interrupted = True
            self.ctrl[0] = STOPPING
            self.continue_stopped(time.monotonic(), every=True)
            exit_code = self.relay.stop()
        finally:
            self.continue_stopped(time.monotonic(), every=True)
            for client in self.clients:
                if client.proc.is_alive():
                    client.proc.kill()
                    client.proc.join(2)
            self.relay.stop()
            if self.echo is not None:
                self.echo.close(timeout=2.0)
        report = build_report(self.gather(exit_code))
        if self.own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return report

    def wait_for_relay(self) -> None:
        """Wait until the relay listens; ``SoakError``, with the end of its log, when it does not start."""
        assert self.relay is not None
        try:
            self.relay.wait_ready(READY_TIMEOUT)
        except ProcessFailed:
            code = self.relay.proc.poll()
            raise SoakError(f"the relay did not start (exit code {code}):\n{self.relay.tail()}") from None

    # figures

    def gather(self, relay_exit: int | None) -> RunFigures:
        """What the report needs from the files and processes of the run, once every one has stopped."""
        figures, relay = self.figures, self.relay
        with contextlib.suppress(ProcessFailed):
            figures.relay_figures = relay.figures() if relay else None
        figures.relay_exit = relay_exit
        if relay is not None and (relay_exit != 0 or figures.relay_figures is None):
            figures.relay_tail = relay.tail(10).splitlines()
        if self.echo is not None:
            figures.echo_beacons, figures.echo_echoes = self.echo.beacons, self.echo.echoes
            figures.echo_error = self.echo.error
        for client in self.clients:
            if client.detail_path.exists():
                figures.detail_lines[client.index] = client.detail_path.read_text().splitlines()[:MAX_DETAILS]
        figures.gap_checks = self._check_gaps()
        return figures

    def _check_gaps(self) -> dict[int, GapCheck]:
        """Every gap the positioned subscribers heard of, checked against the witness's record."""
        record = None
        if self.keys_path is not None and self.keys_path.exists():
            record = WitnessRecord.parse(self.keys_path.read_bytes())
        checks = {}
        for client in self.clients:
            if client.kind == "sub" and client.positioned and client.gaps_path and client.gaps_path.exists():
                lines = client.gaps_path.read_text().splitlines()
                checks[client.index] = check_gaps(record, lines, f"sub-{client.index}")
        return checks


def _end_hung(client: Client) -> None:
    """A client still running when it should have ended is hung: kill it."""
    if client.proc.is_alive():
        client.hung = True
        client.proc.kill()
        client.proc.join(2)
