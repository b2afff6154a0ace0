# The lock-step loop in C (services/tftp/_lockstep.c); see its header for the contract.
from typing_extensions import Buffer

DECLINED: int
TIMED_OUT: int
SHORT_READ: int
MAX_SLOTS: int

def run(
    sock: int,
    fd: int,
    slots: Buffer,
    count: int,
    blksize: int,
    sent: int,
    below: int,
    first: int,
    loaded: int,
    ack: Buffer,
    rearm_us: int,
    /,
) -> tuple[int, int, int, int, int, float]: ...
