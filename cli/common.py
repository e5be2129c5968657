"""What both command-line tools share: JSONL records with errors that name the file and line, argument types that
say what is wrong, pre-flight checks of files (before torch is imported), progress that shows in a log file, one model
loader, and the error convention: a user's mistake is one line on stderr, exit status 2 when the command line cannot
be carried out as written (an option's value, a missing or conflicting option, a path an option names that does not
exist or is of the wrong kind -- a model directory too -- or an output that would overwrite an input or another
output), 1 when what is inside a file, a record or a model is wrong or the work fails; --debug shows the traceback."""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys

ID_HEX = 32  # default ids: 'rec-' + 128 bits of the record's sha256; two records share one with p ~ n^2 / 2^129
ID_MAX_CHARS = 1024  # a given id is a label, not content: longer ones are refused at read time


class UsageError(ValueError):
    """The command line itself is wrong (exit status 2, like argparse's own errors)."""


def read_jsonl(path, need=()):
    """The JSON-object records of a UTF-8 JSONL file, each with an 'id': its own, or 'rec-' + 32 hex digits (128 bits)
    of the sha256 of the record's JSON (sorted keys), so a default id follows its record when the file is reordered or
    lines are inserted. Two lines with one id are an error naming both, unless they are the same record (no id
    given, identical content): its repeats get '-2', '-3', ..., which may swap between identical records only. A
    given id is a string or a whole number of at most ID_MAX_CHARS characters. A missing or empty file, a line that
    is not UTF-8 or not a JSON object, text that is not Unicode (a lone surrogate escape), a bad id, or a record
    without one of `need` is a ValueError naming file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    out, seen, repeats = [], {}, {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                rec = json.loads(raw.decode("utf-8")) if raw.strip() else None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except ValueError as e:  # not JSON, or an integer past Python's digit limit
                raise ValueError(f"{path}:{n}: not JSON that can be read ({str(e)[:160]})") from None
            if rec is None:
                continue
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: a record must be a JSON object, got {type(rec).__name__}")
            missing = [k for k in need if k not in rec]
            if missing:
                raise ValueError(f"{path}:{n}: the record has no {missing[0]!r} (needs {', '.join(need)})")
            try:
                json.dumps(rec, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{path}:{n}: the record holds text that is not Unicode ({e.object[e.start:e.end]!r}, "
                                 "a lone surrogate escape such as \\ud800)") from None
            content = json.dumps(rec, sort_keys=True)
            sid = rec.get("id")
            if sid is None:
                sid = "rec-" + hashlib.sha256(content.encode()).hexdigest()[:ID_HEX]
            elif isinstance(sid, bool) or not isinstance(sid, (str, int)) or len(str(sid)) > ID_MAX_CHARS or sid == "":
                raise ValueError(f"{path}:{n}: id {str(sid)[:60]!r}{'...' if len(str(sid)) > 60 else ''} must be a "
                                 f"non-empty string or a whole number of at most {ID_MAX_CHARS} characters, got "
                                 f"{type(sid).__name__} of {len(str(sid))}")
            if sid in seen and "id" not in rec and seen[sid][1] == content:  # an identical record repeated
                repeats[sid] = repeats.get(sid, 1) + 1
                sid = f"{sid}-{repeats[sid]}"
            if sid in seen:
                raise ValueError(f"{path}:{n}: id {sid!r} is also the id of line {seen[sid][0]}, another record: "
                                 "every record needs its own id")
            seen[sid] = (n, content)
            rec["id"] = sid
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no records")
    return out


# --- argument types (argparse: a bad value exits 2 with the option's name)
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


def _number(s, ok, must):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"{v} must be {must}")
    return v


def positive(s):
    """argparse type: a finite number > 0."""
    return _number(s, lambda v: 0 < v < math.inf, "a finite number > 0")


def fraction(s):
    """argparse type: a number in (0, 1]."""
    return _number(s, lambda v: 0 < v <= 1, "in (0, 1]")


def finite(s):
    """argparse type: a finite number (any sign)."""
    return _number(s, math.isfinite, "finite")


def positives(s):
    """argparse type: a comma-separated list of finite numbers > 0 ('0.7,1.0,1.5')."""
    return [positive(x) for x in s.split(",")]


def model_dir(s):
    """argparse type: a local model directory, with a config.json or a .gguf file (nothing is downloaded)."""
    if not os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s!r} is not a directory: give a local model directory (nothing is "
                                         "downloaded)")
    if not os.path.isfile(os.path.join(s, "config.json")) and not any(f.endswith(".gguf") for f in os.listdir(s)):
        raise argparse.ArgumentTypeError(f"{s!r} holds no config.json and no .gguf file: not a model directory")
    return s


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage block is for --help) and which refuses an option given twice
    (argparse would keep the last one silently), except those that add up (action 'extend': documented so)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, allow_abbrev=False, **kw)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        for action in self._actions:
            given = [a for a in args if a.split("=", 1)[0] in action.option_strings]
            if len(given) > 1 and not isinstance(action, (argparse._ExtendAction, argparse._AppendAction)):
                self.error(f"{action.option_strings[-1]} is given {len(given)} times: give it once")
        return super().parse_known_args(args, namespace)

    def error(self, message):
        print(f"error: {self.prog}: {message} (--help shows the usage)", file=sys.stderr)
        sys.exit(2)


def parser(prog, description):
    """An ArgumentParser whose --help shows every default and the error convention."""
    return _Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                   epilog="A mistake is one line on stderr: exit status 2 for the command line itself, "
                          "1 for a file, a record or a model. --debug shows the traceback.")


def subparser(sub, name, help):
    p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       epilog="Options that take several values add up when repeated (--val A --val B = --val A B); "
                              "any other option given twice is refused.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def run(main, argv=None):
    """main(argv); a UsageError ends the program with one line on stderr and exit status 2, a ValueError, TypeError or
    OSError (a file, a record, a model) with exit status 1, unless --debug asks for the traceback."""
    args = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    try:
        return main(argv)
    except (ValueError, TypeError, OSError) as e:
        if "--debug" in args:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)


def quiet_libraries():
    """In a log file (stderr not a terminal): no third-party progress bars (their \\r redraws fill a log) and none of
    the libraries' known deprecation warnings; our own progress lines stay. Before transformers is imported."""
    if sys.stderr.isatty():
        return
    import warnings
    for k in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", r".*is_gradient_checkpointing.* is deprecated", FutureWarning)  # peft
    warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)  # torch.func on CPU SDPA


# --- pre-flight checks: every file an option names, before torch is imported and any model loads
def _each(paths):
    """An option's value as a list of paths (one path, several, or None: none)."""
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or [])


def existing(option, paths, kind="file"):
    """Each path an option names exists and is a file (kind 'file') or a directory ('directory'): else exit 2."""
    for p in _each(paths):
        if not (os.path.isfile if kind == "file" else os.path.isdir)(p):
            raise UsageError(f"{option} {p}: no such {kind}")


def distinct(inputs, outputs):
    """No output may be, contain or lie inside an input (a model or adapter directory: every file under it) or another
    output (real paths: links and ./ forms too), so nothing a command reads or writes is lost: {label: path or
    paths}; checked before any work."""
    items = [(label, p, os.path.realpath(p), label in outputs) for label, paths in [*inputs.items(), *outputs.items()]
             for p in _each(paths)]
    for i, (label, p, real, out) in enumerate(items):
        for label2, p2, real2, out2 in items[:i]:
            how = "is" if real == real2 else "lies inside" if real.startswith(real2 + os.sep) else \
                "contains" if real2.startswith(real + os.sep) else None
            if how and (out or out2):
                raise UsageError(f"{label} {p} {how} {label2} {p2}: a command never writes over what it reads or what "
                                 "it writes")


def own_dir(path, option, command, pattern, marker):
    """--out DIR of a command that resumes in it: empty, new, or holding only what the command writes (names matching
    pattern) with its marker file; anything else is another's and is refused (exit 2), never replaced."""
    found = sorted(os.listdir(path)) if os.path.isdir(path) else []
    foreign = [f for f in found if not re.fullmatch(pattern, f)]
    if foreign or (marker not in found and any(".tmp" not in f for f in found)):  # a temp file: a write under way
        raise UsageError(f"{option} {path} holds files {command} did not write ({', '.join((foreign or found)[:3])}"
                         f"{', ...' if len(foreign or found) > 3 else ''}{'' if foreign else f'; no {marker}'}): "
                         f"give a new {option}")


def needs_peft(option):
    """A LoRA option without peft installed: one line, before any model loads."""
    import importlib.util
    try:
        found = importlib.util.find_spec("peft") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        found = False
    if not found:
        raise UsageError(f"{option} needs peft, which is not installed: pip install -r examples/requirements.txt")


def writable_file(path, option):
    """--out FILE: its directory exists and can be written, and the path is not a directory."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory: give a file name")
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise OSError(f"{option} {path}: cannot write there (permission denied)")


def writable_dir(path, option):
    """--out DIR: a directory that exists and can be written, or can be made (its nearest existing parent is
    writable)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path} is a file, not a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise OSError(f"{option} {path}: cannot write in {probe} (permission denied or not a directory)")


def check_gguf(model, gguf_file):
    """--gguf-file must name a file inside --model (a local directory): else the .gguf files there are listed."""
    if gguf_file and not os.path.isfile(os.path.join(model, gguf_file)):
        found = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
        raise UsageError(f"--gguf-file {gguf_file}: no such file in {model} (its .gguf files: "
                         f"{', '.join(found) if found else 'none'})")


# --- progress that a log file shows too: a first line before anything slow, then less_ref.Progress
def first_line(text):
    """The command's first line on stderr, printed once its options and files are checked and before anything slow
    (importing torch takes seconds on a busy machine): what it is about to do."""
    print(text, file=sys.stderr, flush=True)


def phase(desc):
    """A heartbeat for a step without a count (loading a tokenizer or a model, a conversion): a with block."""
    return Progress(None, desc)


def Progress(total, desc, unit="records", initial=0, written=None):
    """less_ref.Progress: a line on stderr at the first update, every PROGRESS_SECONDS of wall time (a timer: a slow
    item or a model load shows too) and at the end, 'desc: done/total unit (pct), rate, ETA'; total=None: a phase
    without a count, 'desc: 1m30s so far' on the timer (a model load, a conversion). less_ref (and torch with it) is
    imported here, after the checks."""
    import time

    from less_ref import Progress

    class Heartbeat(Progress):
        def _line(self):
            t = int(time.time() - self.start)
            print(f"{self.desc}: {t // 60}m{t % 60:02d}s so far", file=sys.stderr, flush=True)

    return (Heartbeat if total is None else Progress)(total, desc, unit, initial, written)


# --- models: a local directory or a GGUF file inside one; nothing is downloaded
def load_tokenizer(model, gguf_file=None, padding_side=None):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if padding_side:
        tok.padding_side = padding_side
    return tok


def load_model(model, gguf_file=None, dtype="float32", lora_adapter=None, lora_r=0, lora_targets="q_proj,v_proj"):
    """A causal LM from a local directory (gguf_file: a GGUF checkpoint in it, read dequantised to float32); trainable
    parameters: a saved peft LoRA adapter, or a fresh LoRA of rank lora_r on lora_targets, or (neither) every
    parameter. A fresh LoRA is built under torch.manual_seed(0), so every process (every rank, every re-run) builds the
    same adapter and the model fingerprint matches across them."""
    import torch
    from transformers import AutoModelForCausalLM
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    lm, info = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), output_loading_info=True, **kw)
    bad = [(k.replace("_", " "), sorted(map(str, v))) for k, v in info.items() if v]
    if bad:  # whatever the log verbosity: a model with random weights must not run quietly
        raise ValueError(f"--model {model}: its weights do not fit its architecture (" + "; ".join(
            f"{k}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for k, v in bad) + "): it would run with random "
            "weights")
    if lora_adapter:
        from peft import PeftModel
        lm = PeftModel.from_pretrained(lm, lora_adapter, is_trainable=True)
        saved = os.path.join(lora_adapter, "adapter_model.safetensors")
        if os.path.isfile(saved):  # peft skips adapter weights whose names do not fit: the LoRA would stay at init
            from safetensors import safe_open
            with safe_open(saved, "pt") as f:
                got = set(f.keys())
            want = {n.replace(".default.", ".") for n, _ in lm.named_parameters() if "lora_" in n}
            if got != want:
                raise ValueError(f"--lora-adapter {lora_adapter}: its weights do not fit the model (e.g. "
                                 f"{sorted(got ^ want)[:2]}): the adapter would run from its initialisation")
    elif lora_r:
        from peft import LoraConfig, get_peft_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            lm = get_peft_model(lm, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                               target_modules=lora_targets.split(",")))
    return lm


def file_sha256(path, chunk=2 ** 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def plain_model_dir(model, gguf_file, out, tokenizer=None):
    """transformers' Trainer refuses a GGUF-quantised model: read it once, dequantised to float32, and save it with its
    tokenizer as the plain model directory out/base-model, with base-model/source.json naming the GGUF file and its
    sha256. Reused when it is there and made from the same file; made from another, it is refused. A plain directory
    (no gguf_file) is returned as it is. Both CLIs take the result as --model."""
    if not gguf_file:
        return model
    import torch
    from transformers import AutoModelForCausalLM
    base, src = os.path.join(out, "base-model"), os.path.join(model, gguf_file)
    source = {"gguf_file": gguf_file, "sha256": file_sha256(src)}
    if os.path.exists(base):
        try:
            with open(os.path.join(base, "source.json")) as f:
                made_from = json.load(f)
        except (OSError, ValueError):
            made_from = None
        if made_from != source:
            raise ValueError(f"{base} exists but was not made from {src} (its source.json: {made_from}): give a new "
                             "--out, or the same GGUF file as before")
        return base
    lm = load_model(model, gguf_file)  # its weights are plain float32, but it is flagged as quantised: copy them
    config = lm.config
    for k in ("quantization_config", "_pre_quantization_dtype"):
        config.__dict__.pop(k, None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(lm.state_dict())
    with written(base) as tmp:  # a killed run leaves base-model.tmpPID, never a half base-model
        (tokenizer or load_tokenizer(model, gguf_file)).save_pretrained(tmp)
        plain.save_pretrained(tmp)
        with open(os.path.join(tmp, "source.json"), "w") as f:
            json.dump(source, f)
    return base


@contextlib.contextmanager
def written(path):
    """The one atomic write of the tools: yields a temp path beside path (a file or a directory to fill), renamed to
    path when the block ends, so a reader sees the old or the whole new content, never half of it; on a failure the
    temp is removed and the error is one OSError naming path."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:  # disk full, read-only directory, a library's own error type
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"{path}: cannot write ({getattr(e, 'strerror', None) or e})") from None


def write_text(path, text):
    """path written whole or not at all (written)."""
    with written(path) as tmp, open(tmp, "w") as f:
        f.write(text)
