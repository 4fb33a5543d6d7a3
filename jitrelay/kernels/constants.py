"""Codes the loops report and their faces read: kept here so that a face can name them without importing numba."""

import platform

# What the send loop reports for a target besides the bytes its socket took.

SEND_FAILED = -1  # the socket took nothing: it is full, or an error the engine finds on its next send
SEND_SKIPPED = -2  # the target the loop was told to skip: the batch's own publisher

# The slots of the counts array ``record_loops.gather`` fills in.
RECORD_MESSAGES = 0  # whole messages walked
RECORD_WRONG_SIZE = 1  # records of the type whose length is not the layout's: left out, counted
RECORD_TRUNCATED = 2  # records running past their payload, or a batch ending mid-message: left out, counted

# What the read loop (``read_loop.forward_read``) reports.

READ_NOT_TAKEN = 0  # not a run of whole forwarded messages: nothing changed, the caller takes the usual way
READ_FORWARDED = 1  # committed to the log and sent to every target
READ_JUDGED = 2  # whole forwarded messages, judged only (``STAGE_JUDGE``): the caller journals them, then sends

# How much of the read path one call runs: all of it, or in two calls around the journal's append.

STAGE_ALL, STAGE_JUDGE, STAGE_SEND = 0, 1, 2

# The relay log's scalars in one int64 array (``server.log.RelayLog.state``), which the read loop moves.

LOG_SIZE, LOG_MIRROR, LOG_RESERVE, LOG_BATCH_CAPACITY, LOG_HEAD, LOG_TAIL, LOG_MESSAGES, LOG_LO, LOG_HI = range(9)
# The oldest stream offset a cursor behind still needs: the read loop takes no read whose commit would evict it.
LOG_KEEP = 9
LOG_STATE_SLOTS = 10
KEEP_EVERYTHING_EVICTABLE = 1 << 62  # ``LOG_KEEP`` when no cursor is behind: any commit may evict
# A cursor in the relay's cursor table (``server.cursors``) whose own writer serves it from its position in the log:
# ``CursorMode.BEHIND``. The read loop lowers ``LOG_KEEP`` to the position of every unfiltered one.
CURSOR_BEHIND = 2

# What the poll loop (``poll_loop.read_ready``) reports for each read it made: one row of ``POLL_WORDS`` per read.

POLL_KIND, POLL_SLOT, POLL_AT, POLL_BYTES, POLL_GOT, POLL_MESSAGES, POLL_FORWARDED = range(7)
POLL_START, POLL_SHORT, POLL_ARRIVED, POLL_BEGAN, POLL_ENDED = range(7, 12)
POLL_WORDS = 12
# struct epoll_event: uint32 events, then the uint64 data, packed on x86-64 only (the kernel's ABI).
EPOLL_DATA_AT = 4 if platform.machine() in ("x86_64", "AMD64") else 8
EPOLL_EVENT_BYTES = EPOLL_DATA_AT + 8
POLLED_FORWARDED = 0  # committed and sent; what followed the last whole message is the slot's carry now
POLLED_NOT_TAKEN = 1  # ``ring[at:at + bytes]`` (carry and read) is not all whole forwarded messages: Python's
POLLED_CLOSED = 2  # the peer closed: ``recv`` read nothing
POLLED_FAILED = 3  # ``recv`` failed (or found nothing after all): the event loop's transport finds out which
POLLED_NO_ROOM = 4  # the carry fills what is left before the ring mirror's end: nothing read
POLLED_CARRY = 5  # forwarded (perhaps nothing), but the unfinished message after it is longer than the carry limit
POLLED_UNFINISHED = 6  # nothing whole yet: the read (and the carry before it) is the slot's carry now
POLLED_JUDGED = 7  # whole forwarded messages, judged only (a journal takes them first): ``ring[at:at + bytes]``
