"""How a dialog's kernel gets the `loopbook` helper module and its dialog-scoped token."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

HELPER_PATH = Path(__file__).with_name("kernel_helper.py")
KERNEL_TOKEN_PREFIX = "lbk"


def kernel_token(app_token: str, dialog_id: int) -> str:
    """A token that opens one dialog's API and nothing else; derived, so nothing needs storing."""
    mac = hmac.new(app_token.encode(), f"kernel:{dialog_id}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{KERNEL_TOKEN_PREFIX}{dialog_id}.{mac}"


def dialog_of_kernel_token(app_token: str, token: str) -> int | None:
    """The dialog a kernel token is for, or None when it is not a valid kernel token."""
    if not token.startswith(KERNEL_TOKEN_PREFIX) or "." not in token:
        return None
    head = token[len(KERNEL_TOKEN_PREFIX):].split(".", 1)[0]
    if not head.isdigit():
        return None
    return int(head) if hmac.compare_digest(token.encode(), kernel_token(app_token, int(head)).encode()) else None


def kernel_env(base_url: str, app_token: str, dialog_id: int) -> dict[str, str]:
    return {"LOOPBOOK_URL": base_url, "LOOPBOOK_DIALOG_ID": str(dialog_id),
            "LOOPBOOK_KERNEL_TOKEN": kernel_token(app_token, dialog_id)}


def kernel_init_code() -> str:
    """Silent code that loads the helper as the module `loopbook`, without putting our folders on sys.path."""
    return (
        "import importlib.util as _lb_u, sys as _lb_s\n"
        f"_lb_spec = _lb_u.spec_from_file_location('loopbook', {str(HELPER_PATH)!r})\n"
        "_lb_m = _lb_u.module_from_spec(_lb_spec); _lb_spec.loader.exec_module(_lb_m); _lb_s.modules['loopbook'] = _lb_m\n"
        "del _lb_u, _lb_s, _lb_spec, _lb_m\n"
    )
