"""`python -m execfeedback adapter list|show|export|import|remove|record-eval`: the adapter registry by hand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dialog import NotFound

from ..traces import open_store
from . import registry as adapters

HELP = "list, show, export (one .gguf file with its card), import or remove LoRA adapters"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, text: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=text, description=text)
        a.add_argument("--data-dir", help="Loopbook data directory (default: $LOOPBOOK_DATA_DIR or ~/.loopbook)")
        return a

    action("list", "the registered adapters")
    a = action("show", "one adapter's record and card")
    a.add_argument("name")
    a.add_argument("--json", action="store_true", help="the record as JSON")
    a = action("export", "write NAME.gguf (the card and record inside its metadata) and NAME.md into --out")
    a.add_argument("name")
    a.add_argument("--out", required=True, help="directory to write into")
    a = action("import", "register a shared adapter file (it names the base model it belongs to)")
    a.add_argument("file")
    a.add_argument("--name", help="register it under this name")
    a.add_argument("--replace", action="store_true", help="overwrite an adapter of the same name")
    a = action("remove", "unregister an adapter and delete its file")
    a.add_argument("name")
    a = action("record-eval", "keep an eval's pass@1 figures on an adapter (the card shows them side by side)")
    a.add_argument("name")
    a.add_argument("results", help="the results JSON written by `python -m execfeedback eval`")
    a.add_argument("--role", required=True, choices=adapters.EVAL_ROLES,
                   help="base: the base model alone; adapter: the base with this adapter")
    return p


def _line(r: dict) -> str:
    after = (r.get("eval_after") or {}).get("pass_by_round") or []
    before = (r.get("eval_before") or {}).get("pass_by_round") or []
    ev = (f"  pass@1 final round: base {100 * before[-1]:.1f}%, adapter {100 * after[-1]:.1f}%"
          if before and after else "")
    return (f"{r['name']:<24} {r['method']:<8} {r['size_bytes'] / 2**20:7.1f} MB  base {r['base_file']} "
            f"({r['base_sha256'][:12]})  {r['created_at'][:16]}{ev}")


def run(args: argparse.Namespace) -> int:
    store = open_store(args.data_dir)
    try:
        if args.action == "list":
            rows = adapters.list_adapters(store)
            if not rows:
                print("No adapters yet. Train one: python -m execfeedback finetune --out NAME")
            for r in rows:
                print(_line(r))
        elif args.action == "show":
            rec = adapters.get(store, args.name)
            print(json.dumps(rec, indent=2, ensure_ascii=False) if args.json else adapters.card(rec))
        elif args.action == "export":
            gguf_file, md = adapters.export_adapter(store, args.name, args.out)
            print(f"Wrote {gguf_file} ({gguf_file.stat().st_size / 2**20:.1f} MB; its card and record are inside) "
                  f"and {md}.")
        elif args.action == "import":
            rec = adapters.import_adapter(store, args.file, name=args.name, replace=args.replace)
            print(f"Imported {rec['name']!r}: for base {rec['base_file']} (sha256 {rec['base_sha256'][:12]}...).")
        elif args.action == "remove":
            rec = adapters.remove(store, args.name)
            print(f"Removed {rec['name']!r} and {rec['path']}.")
        elif args.action == "record-eval":
            path = Path(args.results).expanduser()
            try:
                results = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise adapters.AdapterError(f"{path}: not a readable eval results JSON ({e}).") from None
            rec = adapters.record_eval(store, args.name, results, role=args.role)
            print(adapters.card(rec).split("## Evaluation", 1)[1].strip())
        return 0
    except (adapters.AdapterError, NotFound) as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        store.close()


if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(prog="python -m execfeedback adapter", description=HELP))
    sys.exit(run(parser.parse_args()))
