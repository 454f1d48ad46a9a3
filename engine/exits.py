"""The last line of a run that ends early, by how it ended and whether it had begun (its run folder
claimed): before that nothing was written, so there is nothing to resume and the line says so."""
from __future__ import annotations

RESUME = "the last checkpoint.pth.tar is complete; the same command with --resume auto continues the run"
NOT_BEGUN = "nothing was written"


def interrupted_line(*, began: bool, rank: int, distributed: bool) -> str:
    """SIGINT/SIGTERM. Under torchrun a process is stopped by a signal when another one failed
    (torchrun ends them all); every rank says so, the others naming their rank."""
    if not distributed:
        return ("interrupted; the last checkpoint.pth.tar is complete (writes are atomic); continue with --resume"
                if began else f"interrupted before the run began; {NOT_BEGUN}")
    where = f" (rank {rank})" if rank else ""
    why = "torchrun ends every process when one fails (its error is above) or the job is stopped"
    if began:
        return f"stopped{where}: {why}; {RESUME}"
    return f"stopped{where} before the run began: {why}; {NOT_BEGUN}; fix that error and start again"


def lost_peer_line(*, began: bool, rank: int, cause: str) -> str:
    """A collective failed because another process died (or hangs past --dist-timeout)."""
    after = RESUME if began else f"the run had not begun and {NOT_BEGUN}; fix their error and start again"
    return f"error: rank {rank} lost the other processes ({cause[:200]}); {after}"
