"""Codes the loops report and their faces read: kept here so that a face can name them without importing numba."""

# What the send loop reports for a target besides the bytes its socket took.

SEND_FAILED = -1  # the socket took nothing: it is full, or an error the engine finds on its next send
SEND_SKIPPED = -2  # the target the loop was told to skip: the batch's own publisher

# The slots of the counts array ``record_loops.gather`` fills in.
RECORD_MESSAGES = 0  # whole messages walked
RECORD_WRONG_SIZE = 1  # records of the type whose length is not the layout's: left out, counted
RECORD_TRUNCATED = 2  # records running past their payload, or a batch ending mid-message: left out, counted
