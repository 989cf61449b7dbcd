"""Run transformers' own LLaVA-NeXT tests on transformers' classes and on ours, and compare.

Usage (see docs/transformers-suite.md for getting the sources)::

    python tools/transformers_suite/run.py --src /path/to/transformers-checkout [--only ours] [-k EXPR]

``--src`` is a folder holding transformers' ``tests/`` (the shared testers and ``tests/models/llava_next/``)
and ``utils/``. Each run is a pytest subprocess with ``HF_HUB_OFFLINE=1`` and the :mod:`bind` plugin
(``LLAVA_SUITE_MODE=reference`` or ``ours``). Tests that need the hub are left out of both runs: the hub
integration class is deselected up front, and any test whose reference run fails with an offline/hub error
is counted as "needs hub" and dropped from both sides of the comparison.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TEST_FILES = (
    "tests/models/llava_next/test_modeling_llava_next.py",
    "tests/models/llava_next/test_image_processing_llava_next.py",
    "tests/models/llava_next/test_processing_llava_next.py",
)
# always deselected: every test of this class loads llava-hf checkpoints from the hub in setUp
DESELECT_K = "not IntegrationTest"
# a reference failure whose message matches this needs the hub (offline mode turns hub calls into these)
HUB_ERROR = re.compile(
    r"OfflineModeIsEnabled|ConnectError|Name or service not known|LocalEntryNotFoundError|offline mode|"
    r"HF_HUB_OFFLINE|huggingface\.co|"
    r"We couldn't connect|Cannot find an appropriate cached snapshot|is not a local folder and is not a valid model",
    re.IGNORECASE,
)


def run_suite(mode: str, src: Path, files: list[str], k: str | None, out: Path, timeout: float) -> dict[str, tuple]:
    """Run pytest once in ``mode``; return ``{test id: (outcome, message)}``."""
    xml = out / f"{mode}.xml"
    env = dict(os.environ)
    env.update(
        LLAVA_SUITE_MODE=mode,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(
            [str(src), str(src / "utils"), str(HERE), str(REPO), str(REPO / "sdk"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    tokenizer = local_tokenizer(out)
    if tokenizer:
        env["LLAVA_SUITE_TOKENIZER"] = str(tokenizer)
    expr = DESELECT_K if not k else f"({DESELECT_K}) and ({k})"
    cmd = [sys.executable, "-m", "pytest", "-p", "bind", "-p", "no:cacheprovider", "-q", "-rN", "--tb=line"]
    cmd += ["--rootdir", str(src), "-k", expr, f"--junitxml={xml}", "-o", "junit_family=xunit2", *files]
    print(f"[{mode}] {' '.join(cmd)}", flush=True)
    log = out / f"{mode}.log"
    with open(log, "w") as fh:
        subprocess.run(cmd, cwd=src, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if not xml.exists():
        sys.exit(f"[{mode}] pytest wrote no report; see {log}")
    return read_junit(xml)


def local_tokenizer(out: Path) -> Path | None:
    """A folder with a llama sentencepiece tokenizer for the processor tests (see bind.py), or None."""
    try:
        import mistral_common
    except ImportError:
        return None
    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not model.is_file():
        return None
    folder = out / "llama-tokenizer"
    folder.mkdir(exist_ok=True)
    shutil.copy(model, folder / "tokenizer.model")
    return folder


def read_junit(xml: Path) -> dict[str, tuple]:
    results: dict[str, tuple] = {}
    for case in ET.parse(xml).iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "") + "\n" + (child.text or "")
                break
            if child.tag == "skipped":
                outcome, message = "skipped", child.get("message") or ""
        results[test_id] = (outcome, message)
    return results


def warn_if_generation_tests_missing(src: Path) -> None:
    """Say so when ``tests/generation/test_utils.py`` has no ``generate`` tests (an empty stand-in, say):
    the modeling test then runs without transformers' ``GenerationTesterMixin`` tests, on both sides alike."""
    tester = src / "tests" / "generation" / "test_utils.py"
    text = tester.read_text(encoding="utf-8") if tester.is_file() else ""
    if "def test_greedy_generate" not in text:
        print(
            f"note: {tester} has no GenerationTesterMixin tests: no generate() test will run "
            "(use transformers' own file, see docs/transformers-suite.md)",
            flush=True,
        )


def count(results: dict[str, tuple], leave_out: set[str]) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for test_id, (outcome, _) in results.items():
        if test_id not in leave_out:
            counts[outcome] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="folder with transformers' tests/ and utils/")
    parser.add_argument("--only", choices=("reference", "ours"), help="run one side only (no comparison)")
    parser.add_argument("-k", help="extra pytest -k expression, applied to both runs")
    parser.add_argument("--files", nargs="*", default=list(TEST_FILES), help="test files, relative to --src")
    parser.add_argument("--out", type=Path, help="folder for the logs and junit reports (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed for each run")
    args = parser.parse_args()

    src = args.src.resolve()
    missing = [f for f in args.files if not (src / f).is_file()]
    if missing:
        sys.exit(f"not found under {src}: {', '.join(missing)} (see docs/transformers-suite.md)")
    warn_if_generation_tests_missing(src)
    out = args.out or Path(tempfile.mkdtemp(prefix="llava-suite-"))
    out.mkdir(parents=True, exist_ok=True)

    modes = [args.only] if args.only else ["reference", "ours"]
    results = {mode: run_suite(mode, src, args.files, args.k, out, args.timeout) for mode in modes}
    reference = results.get("reference", {})
    needs_hub = {t for t, (outcome, msg) in reference.items() if outcome == "failed" and HUB_ERROR.search(msg)}

    for mode in modes:
        c = count(results[mode], needs_hub)
        print(f"{mode:9s}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
    if needs_hub:
        print(f"left out of both (need the hub, failed offline on the reference): {len(needs_hub)}")
        for test_id in sorted(needs_hub):
            print(f"  {test_id}")
    if len(modes) == 2:
        ours = results["ours"]
        only_ours = sorted(
            t for t, (o, _) in reference.items() if o == "passed" and ours.get(t, ("missing", ""))[0] != "passed"
        )
        print(f"pass on the reference, not on ours (failed or skipped): {len(only_ours)}")
        for test_id in only_ours:
            outcome, msg = ours.get(test_id, ("missing", "not run"))
            lines = msg.strip().splitlines()
            print(f"  {test_id} [{outcome}]: {lines[0][:160] if lines else ''}")
    print(f"logs and junit reports: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
