"""Codes the loops report and their faces read: kept here so that a face can name them without importing numba."""

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
LOG_STATE_SLOTS = 9
