"""Keep credentials given as flags out of everything a run records.

``--hub_token`` (and any ``--*_token`` / ``--*api_key*`` flag) is dropped from
``run_args.json`` and masked by transformers in the logged config, but wandb also
records the command line itself (``args`` in the run's ``wandb-metadata.json``,
uploaded by ``wandb sync``), read from ``sys.argv`` when the run starts.  So once
the flags are parsed, their secret values are replaced in ``sys.argv``.
"""
from __future__ import annotations

import re
import sys

REDACTED = "<redacted>"
_SECRET_FLAG = re.compile(r"^--?[\w.-]*(?:_token|api_key|apikey|password|secret)$", re.IGNORECASE)


def is_secret_flag(flag: str) -> bool:
    """True for flag names whose value is a credential (``--hub_token``, ``--wandb_api_key``)."""
    return bool(_SECRET_FLAG.match(flag))


def redact_secrets(argv: list[str]) -> list[str]:
    """``argv`` with the value of every secret flag (``--flag value`` or ``--flag=value``) replaced."""
    out = []
    expect_value = False
    for arg in argv:
        if expect_value and not arg.startswith("--"):
            out.append(REDACTED)
            expect_value = False
            continue
        expect_value = False
        name, eq, _ = arg.partition("=")
        if is_secret_flag(name):
            if eq:
                out.append(f"{name}={REDACTED}")
            else:
                out.append(arg)
                expect_value = True
            continue
        out.append(arg)
    return out


def redact_secrets_in_argv() -> None:
    """Replace secret flag values in ``sys.argv`` in place (what wandb and other recorders read)."""
    sys.argv[:] = redact_secrets(sys.argv)
