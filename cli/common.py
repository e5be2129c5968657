"""What both command-line tools share: JSONL records with errors that name the file and line, argument types
that say what is wrong, and one line instead of a traceback for a user's mistake (--debug shows it)."""
import argparse
import hashlib
import json
import os
import sys


def read_jsonl(path, need=()):
    """The JSON-object records of a UTF-8 JSONL file, each with an 'id': its own, or 'rec-' + 12 hex digits of the
    sha256 of the record's JSON (sorted keys; a repeat of the same record gets '-2', '-3', ...), so a default id
    follows its record when the file is reordered or lines are inserted. A missing or empty file, a line that is
    not UTF-8 or not a JSON object, or a record without one of `need` is a ValueError naming file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    out, seen = [], {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                rec = json.loads(raw.decode("utf-8")) if raw.strip() else None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if rec is None:
                continue
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: a record must be a JSON object, got {type(rec).__name__}")
            missing = [k for k in need if k not in rec]
            if missing:
                raise ValueError(f"{path}:{n}: the record has no {missing[0]!r} (needs {', '.join(need)})")
            if "id" not in rec:
                h = "rec-" + hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:12]
                seen[h] = seen.get(h, 0) + 1
                rec["id"] = h if seen[h] == 1 else f"{h}-{seen[h]}"
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def whole(lo):
    """argparse type: a whole number >= lo."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be >= {lo}")
        return v
    return parse


def positive(s):
    """argparse type: a finite number > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{v} must be a finite number > 0")
    return v


def positives(s):
    """argparse type: a comma-separated list of finite numbers > 0 ('0.7,1.0,1.5')."""
    return [positive(x) for x in s.split(",")]


def model_dir(s):
    """argparse type: a local model directory (nothing is downloaded)."""
    if not os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s!r} is not a directory: give a local model directory (nothing is downloaded)")
    return s


def parser(prog, description):
    """An ArgumentParser whose --help shows every default."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def subparser(sub, name, help):
    p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def run(main, argv=None):
    """main(argv); a ValueError, TypeError or OSError (a user's mistake: a file, a record, an argument) ends the
    program with one line on stderr and exit status 1, unless --debug asks for the traceback."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except (ValueError, TypeError, OSError) as e:
        if "--debug" in args:
            raise
        sys.exit(f"error: {e}\n(--debug shows the traceback)")
