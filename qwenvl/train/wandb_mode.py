"""Where a ``--report_to wandb`` run goes: the user's wandb project, or offline files when it cannot.

wandb's own default is right and is left alone: online when the user has credentials
(``WANDB_API_KEY``, a ``wandb login`` entry in the netrc file, or an identity token
file), whatever ``WANDB_MODE`` says when it is set.  Only when none of these exists
would ``wandb.init`` stop the run to ask for a key (or fail without a terminal), so
there, and only there, the run logs offline and one line says where the run is and
how to upload it with ``wandb sync``.

wandb writes its files under ``WANDB_DIR`` (default: the current directory); this
points it at the run's ``--output_dir`` unless the user set ``WANDB_DIR``, so the
dashboard files live with the checkpoints they describe.

Decided in the training process (``train_qwen``), not in a shell script, so it holds
for every way of launching.  Nothing here reads the key itself or writes it anywhere.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_HOST = "https://api.wandb.ai"


def _netrc_path(environ) -> Path:
    """The netrc file wandb reads: $NETRC, else ~/.netrc, else ~/_netrc (as wandb's own lookup)."""
    if environ.get("NETRC"):
        return Path(environ["NETRC"]).expanduser()
    home = Path(environ.get("HOME") or Path.home())
    unix = home / ".netrc"
    windows = home / "_netrc"
    return windows if not unix.exists() and windows.exists() else unix


def wandb_credentials_found(environ=os.environ) -> bool:
    """True when wandb would find credentials: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or a netrc
    entry for the wandb host (``WANDB_BASE_URL``, default api.wandb.ai)."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(environ.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    path = _netrc_path(environ)
    try:
        return bool(host) and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):  # no file, unreadable, or not parseable: wandb finds nothing either
        return False


def configure_wandb(report_to, output_dir: str, environ=os.environ) -> list[str]:
    """Set ``WANDB_DIR`` (and ``WANDB_MODE=offline`` when no credentials exist) for a run that reports
    to wandb; returns the lines to print (empty when wandb is not used or its own choice stands)."""
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" not in targets and "all" not in targets:
        return []
    environ.setdefault("WANDB_DIR", os.path.abspath(output_dir))
    if environ.get("WANDB_MODE") or wandb_credentials_found(environ):
        return []
    environ["WANDB_MODE"] = "offline"
    runs = os.path.join(environ["WANDB_DIR"], "wandb")
    return [f"wandb: no credentials found (WANDB_API_KEY or `wandb login`), so this run logs offline to {runs}; "
            f"upload it later with: wandb sync {os.path.join(runs, 'offline-run-*')}"]
