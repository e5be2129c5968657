"""Conformance-suite machinery shared by test_minpp.py and test_less.py.

- `impl`: the module under test. The reference (minpp_ref / less_ref) by default; any importable module
  named with --minpp-impl / --less-impl or MINPP_IMPL / LESS_IMPL. A function the candidate lacks skips
  the tests that need it, with a reason naming it; the run's summary lists what was not provided and how
  many tests reached the candidate. When a candidate is named, the tests of that file that do not use
  `impl` (reference-only internals) are deselected: the run spends its time on the candidate.
- Two tiers. Core (unmarked): what every correct implementation must do -- values, gradients, orderings,
  invariances, exact boundaries on exactly representable inputs, the storage contract, refusals that protect
  correctness. Policy (@pytest.mark.policy): this project's own promises -- bad inputs refused with a message
  naming the culprit, exact error types, robustness beyond what the original code handles. Every run prints
  both verdicts per implementation; a candidate's verdict is the core tier: its policy failures are reported
  as xfail (not required for conformance) unless --policy makes them count. The reference must pass both.
- Hypothesis profiles: "ci" (default, fast) and "thorough" (--hypothesis-profile thorough, or
  HYPOTHESIS_PROFILE=thorough).
- TOL: one per-dtype tolerance table. `device`: cpu, plus cuda where present (skipped cleanly elsewhere).
"""
import importlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=30, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True,
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
_MODULES = {"minpp": ("minpp_ref", "MINPP_IMPL"), "less": ("less_ref", "LESS_IMPL")}
_NOT_PROVIDED = {}


def pytest_configure(config):
    # torch.func has no batching rule for CPU SDPA yet; the fallback is correct, only slower
    config.addinivalue_line("filterwarnings", "ignore:There is a performance drop:UserWarning")
    config.addinivalue_line("markers", "policy: this project's own promise (messages, error types, extreme "
                                       "ranges), not a condition for a correct implementation")


def pytest_addoption(parser):
    for kind, (ref, env) in _MODULES.items():
        parser.addoption(f"--{kind}-impl", default=os.environ.get(env, ref),
                         help=f"importable module to test in place of {ref} (or set {env})")
    parser.addoption("--policy", action="store_true",
                     help="a candidate's policy-tier failures fail the run too (by default only the core tier does)")


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


@pytest.fixture(scope="module")
def impl(request):
    """The implementation for this test module (IMPL_KIND = 'minpp' or 'less' at its top)."""
    kind = request.module.IMPL_KIND
    name = request.config.getoption(f"--{kind}-impl")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        pytest.exit(f"cannot import the {kind} implementation {name!r}: {e}", returncode=4)
    return Impl(module, kind)


def _candidates(config):
    """{test file kind: module name} for the kinds whose implementation is not the reference."""
    return {kind: config.getoption(f"--{kind}-impl") for kind, (ref, _) in _MODULES.items()
            if config.getoption(f"--{kind}-impl") != ref}


def pytest_collection_modifyitems(config, items):
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


_REACHED = {}  # {kind: {"core" / "policy": {"passed": n, "failed": n}}}
_POLICY_FAILED = {}  # {kind: [test ids]}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and "impl" in item.fixturenames and rep.outcome in ("passed", "failed"):
        kind = getattr(item.module, "IMPL_KIND", None)
        tier = "policy" if item.get_closest_marker("policy") else "core"
        counts = _REACHED.setdefault(kind, {t: {"passed": 0, "failed": 0} for t in ("core", "policy")})
        counts[tier][rep.outcome] += 1
        if tier == "policy" and rep.failed:
            _POLICY_FAILED.setdefault(kind, []).append(item.nodeid)
            if kind in _candidates(item.config) and not item.config.getoption("--policy"):
                rep.outcome, rep.wasxfail = "skipped", "policy tier: not required for conformance (--policy counts it)"


def pytest_report_header(config):
    return [f"{kind} implementation: {config.getoption(f'--{kind}-impl')}" for kind in _MODULES] + \
           [f"hypothesis profile: {settings._current_profile}"]


def pytest_terminal_summary(terminalreporter, config):
    for kind, tiers in sorted(_REACHED.items()):
        name = config.getoption(f"--{kind}-impl")
        core, policy = tiers["core"], tiers["policy"]
        counted = kind not in _candidates(config) or config.getoption("--policy")
        terminalreporter.write_line(
            f"{name}: core {core['passed']} passed, {core['failed']} failed; policy {policy['passed']} passed, "
            f"{policy['failed']} failed{'' if counted or not policy['failed'] else ' (not required for conformance; --policy counts them)'}")
        for nodeid in _POLICY_FAILED.get(kind, [])[:20]:
            terminalreporter.write_line(f"  policy failed: {nodeid}")
    for name, attrs in sorted(_NOT_PROVIDED.items()):
        terminalreporter.write_line(f"{name}: not provided (tests skipped): {', '.join(sorted(attrs))}")


def word_tokenizer(words):
    """An offline word-level tokenizer over `words` (eos <eos>, pad <pad>, which must be in it) with a ChatML-like
    chat template: no download, for the tests of data preparation and the command lines."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return tok


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def tol():
    return TOL
