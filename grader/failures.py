"""Failures that are not wrong answers: a broken CUDA context, memory exhausted, a process that died. In plain words.

A kernel that reads or writes out of bounds on a GPU ("an illegal memory access") leaves the CUDA context unusable:
every later CUDA call in that process fails with the same error, so the tests after it would fail for a mistake that
is not theirs. The grader charges the test that caused it, stops using the process, and runs the rest in a fresh one
(`python -m grader`), or, under plain pytest, fails them at once with a message that says why.
"""

from __future__ import annotations

import signal

# Errors after which the CUDA context is unusable for the rest of the process ("sticky" errors).
CONTEXT_POISONING = (
    "illegal memory access",
    "an illegal instruction was encountered",
    "misaligned address",
    "unspecified launch failure",
    "device-side assert triggered",
    "invalid program counter",
    "cudaErrorIllegalAddress",
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "hardware stack error",
)
OUT_OF_MEMORY = ("CUDA out of memory", "can't allocate memory", "CUDA_ERROR_OUT_OF_MEMORY")


def poisons_cuda(text: str) -> bool:
    return any(pattern in text for pattern in CONTEXT_POISONING)


def out_of_memory(exc: BaseException) -> str | None:
    """ "GPU" or "host" if the exception says memory ran out, else None."""
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, MemoryError) and not any(pattern in text for pattern in OUT_OF_MEMORY):
        return None
    return "GPU" if "CUDA" in text or "cuda" in text else "host"


def poisoned_message(nodeid: str) -> str:
    return (
        f"the CUDA context was broken by an earlier test ({nodeid}): a kernel there accessed memory outside its "
        "buffers (an illegal memory access; often a missing mask on a load or store), and no CUDA call can succeed "
        "in this process after that. This test did not run; `python -m grader` runs it again in a fresh process, "
        "or run it on its own."
    )


POISON_NOTE = (
    "This is an illegal memory access on the GPU: a kernel read or wrote outside its buffers (often a missing mask "
    "on a load or store, or an index computed past the end). It breaks the CUDA context of the whole process: no "
    "later test can use the GPU in it, so `python -m grader` runs them again in a fresh process."
)


def oom_note(where: str) -> str:
    return (
        f"The test ran out of {where} memory: the code under test asked for more than the machine has (a shape or a "
        "size computed wrongly, or an intermediate far larger than needed). Only this test is charged for it."
    )


def crash_message(returncode: int | None, importing: str | None = None) -> str:
    """Why a test process died in the middle of a test, from its exit status."""
    during = f" while importing {importing}.py" if importing else ""
    if returncode is not None and returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        meaning = {
            "SIGSEGV": "a segmentation fault: native code (an extension, a kernel launch, ctypes) accessed memory "
            "it does not own",
            "SIGBUS": "a bus error: native code accessed memory that is not there",
            "SIGABRT": "aborted: native code (or os.abort) gave up on an error",
            "SIGKILL": "killed: most likely by the system's out-of-memory killer, after the test used all the "
            "memory of the machine",
            "SIGFPE": "a floating-point exception in native code (an integer division by zero)",
            "SIGILL": "an illegal instruction in native code",
        }.get(name, "stopped by a signal")
        return f"crashed{during}: the test process died of {name} ({meaning}). Only this test is charged for it."
    return (
        f"crashed{during}: the test process exited with code {returncode} in the middle of this test (sys.exit, "
        "os._exit or pytest.exit called by the code under test?). Only this test is charged for it."
    )
