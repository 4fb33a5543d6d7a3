"""What the send loop reports for a target besides the bytes its socket took; shared by the loop and its face."""

SEND_FAILED = -1  # the socket took nothing: it is full, or an error the engine finds on its next send
SEND_SKIPPED = -2  # the target the loop was told to skip: the batch's own publisher
