"""Conformance-suite machinery shared by test_minpp.py and test_less.py.

- `impl`: the module under test. The reference (minpp_ref / less_ref) by default; any importable module named with
  --minpp-impl / --less-impl or MINPP_IMPL / LESS_IMPL. A function the candidate lacks skips the tests that need it
  with a reason naming it. When a candidate is named, the tests of that file that do not use `impl`
  (reference-only internals) are deselected: the run spends its time on the candidate.
- SPEC.md is the contract: every test that reaches `impl` names its clause with @pytest.mark.spec("L2.1"); the
  clause's tier (core or policy) is the test's tier, and its id is a marker too (`-m L2.1` runs one clause). The run
  ends with a line per clause (passed, failed, skipped, functions not provided) and the two tier verdicts per
  implementation. A candidate's verdict is the core tier: its policy failures show as xfail unless --policy makes
  them count. A module that provides none of its file's API ends the run with exit status 1 and one line saying so.
- `call(fn, *args, **kw)`: one way to pass an optional argument; a function that does not take it skips the test
  naming it (a None value is dropped instead). `needs_feature(impl, NAME)`: skip where a module declares NAME = False.
- Hypothesis profiles: "ci" (default, fast), "thorough" (--hypothesis-profile thorough, or HYPOTHESIS_PROFILE) and
  "verdict" (--verdict: fewer examples, no shrinking).
- --verdict: a verdict that fits one screen -- no tracebacks, no hypothesis blobs, only the clause table, the tier
  verdicts and one line per failed clause with the command that reproduces it (its full traceback).
- TOL: one per-dtype tolerance table. `device`: cpu, plus cuda where present (skipped cleanly elsewhere).
"""
import importlib
import inspect
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

settings.register_profile("ci", max_examples=30, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("verdict", max_examples=10, deadline=None, print_blob=False,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One tolerance table, keyed by the dtype a result is stored in, for comparing it with a float64 ground
# truth computed from the same (already rounded) inputs. The reference computes in float32 whatever the
# input dtype, so bf16/fp16 inputs must give float32-quality results; a candidate that returns its input
# dtype is held to that dtype's rounding.
TOL = {
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}

REFUSED = (TypeError, ValueError)  # a bad input: TypeError for a wrong type, ValueError for a wrong value
_MODULES = {"minpp": ("minpp_ref", "MINPP_IMPL", "M"), "less": ("less_ref", "LESS_IMPL", "L")}
_NOT_PROVIDED = {}


def _read_spec():
    """{clause id: {"title", "tier", "api"}} from SPEC.md's '### L2.1 Title · core' headings and 'API:' lines."""
    clauses, current = {}, None
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "SPEC.md"), encoding="utf-8") as f:
        for line in f:
            m = re.match(r"### ([LM]\d+\.\d+) (.+) · (core|policy)\s*$", line)
            if m:
                current = clauses[m.group(1)] = {"title": m.group(2), "tier": m.group(3), "api": []}
            elif current is not None and line.startswith("API: "):
                current["api"] = [a.strip().strip("`") for a in line[5:].split(",")]
            elif line.startswith("## "):
                current = None
    return clauses


CLAUSES = _read_spec()


def pytest_configure(config):
    if config.getoption("--verdict"):  # the table and one line per failed clause: no tracebacks, no summary lines
        config.option.tbstyle, config.option.reportchars = "no", ""
        config.option.verbose = min(config.option.verbose, -1)
        settings.load_profile("verdict")
    # torch.func has no batching rule for CPU SDPA yet; the fallback is correct, only slower
    config.addinivalue_line("filterwarnings", "ignore:There is a performance drop:UserWarning")
    config.addinivalue_line("markers", "spec(clause): the SPEC.md clause a test checks (its tier is the clause's)")
    config.addinivalue_line("markers", "policy: this project's own promise (set from the clause's tier)")
    for cid, c in CLAUSES.items():
        config.addinivalue_line("markers", f"{cid}: SPEC.md {cid} {c['title']} ({c['tier']})")


def pytest_addoption(parser):
    for kind, (ref, env, _) in _MODULES.items():
        parser.addoption(f"--{kind}-impl", default=os.environ.get(env, ref),
                         help=f"importable module to test in place of {ref} (or set {env})")
    parser.addoption("--policy", action="store_true",
                     help="a candidate's policy-tier failures fail the run too (by default only the core tier does)")
    parser.addoption("--verdict", action="store_true",
                     help="one screen: the clause table, the tier verdicts and one reproducing command per failed "
                          "clause (no tracebacks; hypothesis: 10 examples, no shrinking)")


_PROBES = {"execute_example", "setup_example", "teardown_example"}


class Impl:
    """The module under test; a missing attribute skips the test with a reason that names it."""

    def __init__(self, module, kind):
        self._module, self._kind = module, kind
        self.name = module.__name__

    def __getattr__(self, attr):
        if attr.startswith(("_", "hypothesis")) or attr in _PROBES:  # pytest/hypothesis probes, not the API
            raise AttributeError(attr)
        try:
            return getattr(self._module, attr)
        except AttributeError:
            _NOT_PROVIDED.setdefault(self.name, set()).add(attr)
            pytest.skip(f"{self.name} does not provide {attr}")


def _import(kind, config):
    name = config.getoption(f"--{kind}-impl")
    try:
        return importlib.import_module(name)
    except Exception as e:  # not found (exit 4), or any error the module raises while it loads (exit 1)
        found = not isinstance(e, ModuleNotFoundError) or e.name != name
        pytest.exit(f"{name}: import failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
                    + ("" if found else f" (is it on PYTHONPATH? the {kind} implementation)"),
                    returncode=1 if found else 4)


@pytest.fixture(scope="module")
def impl(request):
    """The implementation for this test module (IMPL_KIND = 'minpp' or 'less' at its top)."""
    kind = request.module.IMPL_KIND
    return Impl(_import(kind, request.config), kind)


TUNING = {"chunk_rows", "block_rows", "slice_cols"}  # optional arguments that split the work, never change a value


def call(fn, *args, _refused=False, **kwargs):
    """fn(*args, **kwargs) where the keyword arguments are optional features of the SPEC (chunk_rows, row_offset,
    kind, slice_cols, ...), probed per call: a None value is not passed (the function's default holds); a TUNING
    argument the function does not take is dropped (the case runs with the function's own split), and any other
    one it does not take (and no **kwargs) skips the case naming it; a NotImplementedError skips too. _refused=True
    (a test of the argument's own refusal): a TUNING argument the function does not take skips the case too."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params or k not in TUNING or _refused}
        missing = [k for k in kwargs if k not in params]
        if missing:
            pytest.skip(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', fn)} does not take "
                        f"{', '.join(missing)} (an optional feature)")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        pytest.skip(f"{getattr(fn, '__name__', fn)}: not implemented ({e})")


def needs_feature(impl, name):
    """Skip unless the module offers the optional feature `name` (it declares `name = False` to say it does not)."""
    if getattr(impl._module, name, True) is False:
        pytest.skip(f"{impl.name} declares {name} = False: an optional feature it does not have")


def _candidates(config):
    """{test file kind: module name} for the kinds whose implementation is not the reference."""
    return {kind: config.getoption(f"--{kind}-impl") for kind, (ref, _, _) in _MODULES.items()
            if config.getoption(f"--{kind}-impl") != ref}


def _clause(item):
    m = item.get_closest_marker("spec")
    return m.args[0] if m and m.args else None


def pytest_collection_modifyitems(config, items):
    for item in items:
        kind = getattr(item.module, "IMPL_KIND", None)
        cid = _clause(item)
        if "impl" in item.fixturenames and cid is None:
            raise pytest.UsageError(f"{item.nodeid} reaches impl but names no SPEC.md clause (@pytest.mark.spec)")
        if cid is None:
            continue
        if cid not in CLAUSES or not cid.startswith(_MODULES[kind][2]):
            raise pytest.UsageError(f"{item.nodeid} cites {cid}, which is not a clause of SPEC.md's part "
                                    f"{_MODULES[kind][2]}")
        item.add_marker(cid)
        if CLAUSES[cid]["tier"] == "policy":
            item.add_marker("policy")
    cand = _candidates(config)
    if not cand:
        return
    keep, drop = [], []
    for item in items:
        kind = getattr(item.module, "IMPL_KIND", None)
        (drop if kind in cand and "impl" not in item.fixturenames else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_COUNTS = {}  # {kind: {clause: {"passed"/"failed"/"skipped": n}}}
_FAILED = {}  # {kind: {clause: [(test id, one line saying what was expected and what came)]}}
_POLICY_FAILED = {}  # {kind: [test ids]}
_LEFT = {}  # {(kind, clause): selected tests not yet finished}: a clause's line is printed when it reaches 0
WIDTH = 100  # the verdict's columns


def pytest_collection_finish(session):
    for item in session.items:
        cid, kind = _clause(item), getattr(item.module, "IMPL_KIND", None)
        if cid is not None and "impl" in item.fixturenames:
            _LEFT[kind, cid] = _LEFT.get((kind, cid), 0) + 1


def _what_failed(call):
    """The failure in one line: the error's own first line, and where it says little (a bare AssertionError, a
    tensor's repr), the test's line that failed (what was expected), shortened to fit."""
    e = call.excinfo.value
    msg = f"{type(e).__name__}: {' '.join(str(e).split())}".strip()
    if len(msg.split(": ", 1)[-1]) < 25 or re.match(r"\w+: (tensor\(|\[|\(|assert )", msg):
        entry = next((t for t in reversed(call.excinfo.traceback) if os.path.basename(str(t.path)).startswith("test_")),
                     None)
        if entry is not None:
            msg = f"`{' '.join(str(entry.statement).split())}` -- {msg}"
    return msg


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    cid = _clause(item)
    if cid is None or "impl" not in item.fixturenames:
        return rep
    kind = item.module.IMPL_KIND
    if rep.when == "call" or (rep.when == "setup" and rep.outcome != "passed"):
        counts = _COUNTS.setdefault(kind, {}).setdefault(cid, {"passed": 0, "failed": 0, "skipped": 0})
        counts[rep.outcome] += 1
        if rep.failed:
            _FAILED.setdefault(kind, {}).setdefault(cid, []).append((item.nodeid, _what_failed(call)))
        if CLAUSES[cid]["tier"] == "policy" and rep.failed:
            _POLICY_FAILED.setdefault(kind, []).append(item.nodeid)
            if kind in _candidates(item.config) and not item.config.getoption("--policy"):
                rep.outcome, rep.wasxfail = "skipped", "policy tier: not required for conformance (--policy counts it)"
    if rep.when == "teardown" and (kind, cid) in _LEFT:
        _LEFT[kind, cid] -= 1
        tr = item.config.pluginmanager.get_plugin("terminalreporter")
        if not _LEFT[kind, cid] and item.config.getoption("--verdict") and tr is not None:
            _clause_lines(tr, item.config, kind, cid)  # as soon as the clause is done: a failure shows at once
    return rep


def pytest_report_header(config):
    return [f"{kind} implementation: {config.getoption(f'--{kind}-impl')}" for kind in _MODULES] + \
           [f"hypothesis profile: {settings._current_profile}"]


def _clause_order(cid):
    """L2.1 < L10.1: clause ids sorted by their numbers."""
    return [int(x) for x in cid[1:].split(".")]


def _api(part):
    """The public functions a part's clauses name (module-level declarations such as PROJECTION are optional)."""
    return sorted({a for c, v in CLAUSES.items() if c.startswith(part) for a in v["api"] if not a.isupper()})


def _fit(text, indent=""):
    """text in lines of at most WIDTH columns, words kept whole where they fit."""
    import textwrap
    return textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False) or [""]


def _reproduce(config, kind, nodeid):
    """The command that reruns one test as the user ran the suite: their PYTHONPATH and implementation option."""
    impl = config.getoption(f"--{kind}-impl")
    parts = [f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []
    parts += ["python -m pytest" + (f" --{kind}-impl {impl}" if kind in _candidates(config) else ""), f"'{nodeid}'"]
    lines = ["    " + parts[0]]  # shell continuation lines (' \\') where the whole would pass WIDTH columns
    for part in parts[1:]:
        if len(lines[-1]) + 1 + len(part) + 2 <= WIDTH:
            lines[-1] += " " + part
        else:
            lines[-1] += " \\"
            lines.append("      " + part)
    return lines


def _clause_lines(tr, config, kind, cid):
    """A clause's line (passed / failed / skipped, what its API the module lacks) and, when it failed, its first
    failure and the command that reproduces it."""
    module = importlib.import_module(config.getoption(f"--{kind}-impl"))  # imported already: the tests ran
    n, c = _COUNTS.get(kind, {}).get(cid, {"passed": 0, "failed": 0, "skipped": 0}), CLAUSES[cid]
    missing = [a for a in c["api"] if not a.isupper() and not hasattr(module, a)]
    title = c["title"] if len(c["title"]) <= 46 else c["title"][:45] + "~"
    if tr._tw.width_of_current_line:  # after the progress dots of --verdict's streaming lines
        tr.write("\n")
    tr.write_line(f"  {cid:6s} {title:46s} {c['tier']:6s} {n['passed']:4d} / {n['failed']:2d} / {n['skipped']:3d}",
                  red=bool(n["failed"]) and c["tier"] == "core")
    for line in _fit(f"not provided: {', '.join(missing)}", " " * 9) if missing else []:
        tr.write_line(f"         {line.strip()}")
    failures = _FAILED.get(kind, {}).get(cid, [])
    if failures:
        nodeid, msg = failures[0]  # its first failure, and how many more
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        head = f"  FAILED {cid} {c['tier']}{more}: "
        tr.write_line(head + (msg if len(head + msg) <= WIDTH else msg[:WIDTH - len(head) - 3] + "..."),
                      red=c["tier"] == "core")
        for line in _reproduce(config, kind, nodeid):
            tr.write_line(line)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """After pytest's own summary line: the clause lines (--verdict: printed as each clause finished) and the two tier
    verdicts of each implementation, last; clauses no selected test reached are named as not run."""
    result = yield
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None or not _COUNTS:
        return result
    verdict = session.config.getoption("--verdict")
    for kind, by_clause in sorted(_COUNTS.items()):
        ref, _, part = _MODULES[kind]
        module = _import(kind, session.config)
        name = module.__name__
        tr.write_line("")
        if not verdict:
            tr.write_line(f"{name} against SPEC.md part {part} (clause: passed / failed / skipped; not provided):")
            for cid in sorted(by_clause, key=_clause_order):
                _clause_lines(tr, session.config, kind, cid)
        not_run = sorted((c for c in CLAUSES if c.startswith(part) and c not in by_clause), key=_clause_order)
        for line in _fit(f"not run (no selected test): {', '.join(not_run)}", "  ") if not_run else []:
            tr.write_line(line)
        counted = kind not in _candidates(session.config) or session.config.getoption("--policy")
        for tier in ("core", "policy"):
            t = {o: sum(v[o] for cid, v in by_clause.items() if CLAUSES[cid]["tier"] == tier)
                 for o in ("passed", "failed", "skipped")}
            ran = any(CLAUSES[cid]["tier"] == tier for cid in by_clause)
            verdict_word = ("FAIL" if tier == "core" or counted else "not required") if t["failed"] else \
                "PASS" if t["passed"] else "NOTHING TESTED" if ran else "not run"
            tr.write_line(f"{name} {tier} tier: {verdict_word} ({t['passed']} passed, {t['failed']} failed, "
                          f"{t['skipped']} skipped)" + ("; --policy counts these failures"
                                                         if verdict_word == "not required" else ""),
                          bold=True, red=verdict_word in ("FAIL", "NOTHING TESTED"))
        if not any(hasattr(module, a) for a in _api(part)):
            for line in _fit(f"{name} provides none of SPEC.md part {part}'s functions ({', '.join(_api(part)[:5])}, "
                             "...): nothing was tested, exit status 1"):
                tr.write_line(line, red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result


def word_tokenizer(words):
    """An offline word-level tokenizer over `words` (eos <eos>, pad <pad>, which must be in it) with a ChatML-like
    chat template: no download, for the tests of data preparation and the command lines."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                         "{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return tok


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def tol():
    return TOL
