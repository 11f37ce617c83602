"""Every example in the README and docs/ runs as shown.

`curl` lines and Python blocks that use a client (tritonclient) run against a real server on the
shipped model (with a `~/.curlrc` that makes an HTTP error fail the command); `branchserve` commands are parsed by the real command line (long
ones such as `train` are not run) and the cheap ones run; bench scripts must exist and know their
flags; JSON examples of a predict response have the real response's fields, version and points.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving import Server, running_server

from branchserve.cli import main, parser
from branchserve.repo.loading import load_repository

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOKEN = "docs-example-token"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:branchserve [a-z]+|python bench/[^`\s]+) [^`<]+)`")  # a command with arguments
CHEAP = {"inspect"}  # commands run for real; the others are parsed


def fenced(kind: str) -> Iterator[tuple[str, str]]:
    for doc in DOCS:
        for lang, body in FENCE.findall(doc.read_text()):
            if lang == kind or (kind == "shell" and lang in ("", "bash", "sh")):  # output goes in ```text
                yield doc.name, body


def shell_lines() -> list[tuple[str, str]]:
    """(doc, command) for every command in a shell block (continuations joined; in a transcript,
    the lines after a `$ ` prompt) and every inline `branchserve …` / `python bench/…` span."""
    found = []
    for doc, body in fenced("shell"):
        lines = [line.strip() for line in body.replace("\\\n", " ").splitlines()]
        if any(line.startswith("$ ") for line in lines):  # a transcript: commands after prompts, output between
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        found += [(doc, line) for line in lines if line and not line.startswith("#")]
    for doc in DOCS:
        found += [(doc.name, span) for span in INLINE.findall(doc.read_text())]
    return found


def words(line: str) -> list[str]:
    """The command's words without a trailing comment, leading VAR=value settings or a venv prefix."""
    argv = shlex.split(line, comments=True)
    while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):
        argv.pop(0)
    if argv:
        argv[0] = argv[0].removeprefix(".venv/bin/")
    return argv


COMMANDS = [(doc, line) for doc, line in shell_lines() if words(line)[:1] == ["branchserve"]]
CURLS = [(doc, line) for doc, line in shell_lines() if "curl " in line]
CLIENTS = [(doc, body) for doc, body in fenced("python") if "tritonclient" in body]
BENCHES = [(doc, line) for doc, line in shell_lines() if re.match(r"(nice -n \d+ )?python3? bench/", line)]


def test_the_docs_have_examples_of_every_kind() -> None:
    assert len(COMMANDS) > 20 and len(CURLS) >= 5 and len(BENCHES) >= 4 and len(CLIENTS) >= 2


@pytest.mark.parametrize(("doc", "line"), COMMANDS, ids=[f"{d}: {line[:60]}" for d, line in COMMANDS])
def test_branchserve_examples_parse(doc: str, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = words(line)[1:]
    if "--help" in argv:
        with pytest.raises(SystemExit) as help_exit:
            parser().parse_args(argv)
        assert help_exit.value.code == 0
        return
    args = parser().parse_args(argv)
    if args.command in ("inspect", "calibrate"):
        assert (ROOT / args.version_dir).is_dir(), f"{doc}: {args.version_dir} does not exist"
    if args.command in CHEAP and "--plot" not in argv:
        main(argv)
        assert "near-final *" in capsys.readouterr().out


@pytest.mark.parametrize(("doc", "line"), BENCHES, ids=[f"{d}: {line[:60]}" for d, line in BENCHES])
def test_bench_examples_name_real_scripts_and_flags(doc: str, line: str) -> None:
    argv = words(line)
    script = next(w for w in argv if w.startswith("bench/"))
    usage = subprocess.run(["python", script, "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for flag in (w for w in argv if w.startswith("--")):
        assert flag in usage, f"{doc}: {script} has no {flag}"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running_server(ROOT / "models", "--admin-token", TOKEN, "--log-level", "warning") as s:
        yield s


@pytest.mark.parametrize(("doc", "line"), CURLS, ids=[f"{d}: {line[:60]}" for d, line in CURLS])
def test_curl_examples_answer_without_error(doc: str, line: str, server: Server, tmp_path: Path) -> None:
    (tmp_path / ".curlrc").write_text("fail-with-body\nsilent\nshow-error\n")
    command = re.sub(r"(http://)?(localhost|127\.0\.0\.1):8000", server.url, line)
    env = {**os.environ, "HOME": str(tmp_path), "TOKEN": TOKEN}
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{doc}: {line}\n{done.stdout[-500:]}{done.stderr[-500:]}"


@pytest.mark.parametrize(("doc", "code"), CLIENTS, ids=[f"{d}: python block {i}" for i, (d, _) in enumerate(CLIENTS)])
def test_client_examples_run(doc: str, code: str, server: Server) -> None:
    code = code.replace("localhost:8000", server.url.removeprefix("http://")).replace("localhost:8001", server.grpc)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{doc}:\n{code}\n{done.stdout[-500:]}{done.stderr[-2000:]}"


def test_json_examples_of_a_response_match_a_real_one(server: Server) -> None:
    ((manifest, _),) = load_repository(ROOT / "models").values()
    png = (ROOT / "branchserve" / "loadtest" / "samples" / "0000.png").read_bytes()
    with httpx.Client(base_url=server.url) as client:
        real = client.post(f"/v1/models/{manifest.name}/predict", content=png, headers={"content-type": "image/png"})
    real_body = real.raise_for_status().json()
    examples = [json.loads(body) for _, body in fenced("json")]
    responses = [e for e in examples if isinstance(e, dict) and "outputs" in e]
    assert responses
    for example in responses:
        assert set(example) == set(real_body)
        assert set(example["budget"]) == set(real_body["budget"])
        assert set(example["outputs"][0]) <= set(real_body["outputs"][0]) | {"probabilities"}
        assert (example["model"], example["version"]) == (manifest.name, manifest.version)
        assert example["budget"]["operating_point"] in {p.name for p in manifest.frontier}


def test_files_the_examples_read_exist() -> None:
    """Scripts, locustfiles, images and budget files a documented command reads (outputs excluded)."""
    missing = []
    for doc, line in shell_lines():
        for word in shlex.split(line, comments=True):
            path = word.split("@", 1)[-1].split("=", 1)[-1]
            if re.fullmatch(r"[\w./-]+/[\w.-]+\.(py|toml|png)", path) and not path.startswith(
                ("runs/", "reports/", "docs/")
            ):
                missing += [f"{doc}: {path}"] if not (ROOT / path).exists() else []
    assert missing == []
