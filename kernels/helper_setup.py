"""How a dialog's kernel gets the `loopbook` helper module and its dialog-scoped token."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from typing import Callable

HELPER_PATH = Path(__file__).with_name("helper.py")
KERNEL_TOKEN_PREFIX = "lbk"
_DIALOG_ID = re.compile(r"[0-9]{1,19}")


def kernel_token(app_token: str, dialog_id: int, born: str) -> str:
    """A token that opens one dialog's API and nothing else. Derived from the app token, the dialog's id and its
    creation time (`born`), so nothing is stored, and it dies with its dialog: no later dialog has that pair."""
    mac = hmac.new(app_token.encode(), f"kernel:{dialog_id}:{born}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{KERNEL_TOKEN_PREFIX}{dialog_id}.{mac}"


def dialog_of_kernel_token(app_token: str, token: str, born_of: Callable[[int], str | None]) -> int | None:
    """The dialog a kernel token is for, or None when it is not a valid kernel token (or its dialog is gone).
    `born_of(dialog_id)`: that dialog's creation time, None when there is no such dialog."""
    if not token.startswith(KERNEL_TOKEN_PREFIX):
        return None
    head, dot, _ = token[len(KERNEL_TOKEN_PREFIX):].partition(".")
    # ASCII digits only, and few: str.isdigit() takes "²", which int() refuses, and int() refuses 4,301 digits.
    if not dot or not _DIALOG_ID.fullmatch(head):
        return None
    dialog_id = int(head)
    born = born_of(dialog_id)
    if born is None:
        return None
    return dialog_id if hmac.compare_digest(token.encode(), kernel_token(app_token, dialog_id, born).encode()) else None


def kernel_env(base_url: str, app_token: str, dialog_id: int, born: str) -> dict[str, str]:
    return {"LOOPBOOK_URL": base_url, "LOOPBOOK_DIALOG_ID": str(dialog_id),
            "LOOPBOOK_KERNEL_TOKEN": kernel_token(app_token, dialog_id, born)}


def kernel_init_code() -> str:
    """Silent code that loads the helper as the module `loopbook`, without putting our folders on sys.path."""
    return (
        "import importlib.util as _lb_u, sys as _lb_s\n"
        f"_lb_spec = _lb_u.spec_from_file_location('loopbook', {str(HELPER_PATH)!r})\n"
        "_lb_m = _lb_u.module_from_spec(_lb_spec); _lb_spec.loader.exec_module(_lb_m); _lb_s.modules['loopbook'] = _lb_m\n"
        "del _lb_u, _lb_s, _lb_spec, _lb_m\n"
    )
