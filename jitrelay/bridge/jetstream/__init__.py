"""The bridge over NATS JetStream: a domain carried between hosts without loss.

What it must do: every whole-message batch a host's relay forwards reaches
every other host's relay once, in order per sending host, through a bridge
restart, a NATS node failure or a network cut; what still cannot be carried
(a stream limit reached on a lossy domain, retention expired before a host
came back) is counted and logged as a gap, never silent.

The plan:

- One stream per domain (``JITRELAY_<DOMAIN>``, subjects ``<subject>.>``,
  file storage, replicated, limits by age and size, ``discard new``). Each
  host publishes on ``<subject>.<host>``, each NATS message with the headers
  of the core bridge (sender, sequence, offset) plus ``Jitrelay-Previous``
  (where the sender's previous NATS message ended) and ``Nats-Msg-Id``
  ``<host>:<sequence>``, so the stream drops a republished one within its
  duplicate window.
- ``StreamSender`` publishes asynchronously with a bounded window of
  publishes awaiting acknowledgement and its own reply inbox (nats-py's
  ``publish_async`` never resolves a future whose reply is an error). A
  rejected, unanswered or failed publish is sent again, in order, with the same
  id; the window full (the stream is full, or NATS is away) holds the sender
  back. A lossy domain counts a publish the full stream refused as a gap
  instead.
- What the sender publishes comes from the relay's socket, or, where the
  relay journals (execution), from the journal (``JournalTail``): a sending
  bridge that was down resumes after the last message of its own the stream
  holds, so nothing the relay forwarded meanwhile is lost and nothing is sent
  twice. The journal also holds what this host's receiving side wrote into
  the relay; those messages are recognised by their 32-byte header (which
  carries the CRC of the whole message in a checksummed domain) and skipped,
  so nothing comes back to the host it came from.
- The receiving side (``receiver.StreamReceiver``) reads each other host's subject
  through a durable pull consumer ``<host>_from_<remote>``, writes a fetched
  batch into the relay, and acknowledges it only once the relay's socket has
  taken every byte. It keeps, per sending host, the next
  sequence it expects, in a state file replaced atomically after the relay
  took the bytes, so a redelivered message is never written twice; a message
  that arrives before the one it follows (a republish after a node failure)
  waits, unacknowledged, until the one before it arrives.

The modules: ``carrier`` (the stream, where this host's sending stands, the
state saved by one method), ``sender`` (``StreamSender``), ``receiver``
(``StreamReceiver``, ``PullReader``), ``state`` (``BridgeState``,
``EchoFilter``), ``journal`` (``JournalTail``).

Not measured yet: fsync of the state file (it is not fsynced: a process kill
loses nothing, a power cut may replay one batch).
"""
