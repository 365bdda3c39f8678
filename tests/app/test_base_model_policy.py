"""A team's `base_model` field cannot reach the server's files or memory (issue #16).

Every refused probe is sent twice, once with its target present and once without: the answers must be
byte-for-byte the same (no existence oracle). Nothing may be opened (a FIFO would block a reader forever)
nor built (a spy in place of `open_clip.create_model` and `torch.load` fails the test), and the API
process's resident memory must stay where it was.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import open_clip
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Adaptation
from app.settings import DEFAULT_BASE_MODEL_ARCHITECTURES, Settings
from app.storage import ObjectStore
from app.validation import InputError, check_base_model_spec
from must_engine.base_models import SHIPPED_DIR

PROXY = SHIPPED_DIR / "proxy-cifar10-tiny"
NAMES = ["banded", "blotchy"]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def nothing_is_built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the calls that build a network or read a checkpoint with spies that record (and fail)."""
    calls: list[str] = []

    def spy(name: str) -> Callable[..., object]:
        def called(*args: object, **kwargs: object) -> object:
            calls.append(f"{name}{args!r}"[:200])
            raise AssertionError(f"{name} was called for a refused base model")

        return called

    monkeypatch.setattr(open_clip, "create_model", spy("open_clip.create_model"))
    monkeypatch.setattr(torch, "load", spy("torch.load"))
    return calls


@dataclass
class ProbeDirs:
    """Directories for the probes: `allowed` is the operator's weights directory, `outside` is not."""

    root: Path
    allowed: Path
    outside: Path

    @property
    def target(self) -> Path:
        return self.outside / "weights.safetensors"

    def make_file(self) -> None:
        shutil.copy(PROXY / "open_clip_model.safetensors", self.target)

    def make_fifo(self) -> None:
        os.mkfifo(self.target)

    def make_dir(self) -> None:
        self.target.mkdir()

    def remove(self) -> None:
        if self.target.is_dir() and not self.target.is_symlink():
            self.target.rmdir()
        else:
            self.target.unlink(missing_ok=True)


@pytest.fixture
def probe_dirs(tmp_path: Path) -> ProbeDirs:
    probe_dirs = ProbeDirs(tmp_path, tmp_path / "allowed", tmp_path / "outside")
    probe_dirs.allowed.mkdir()
    probe_dirs.outside.mkdir()
    (probe_dirs.allowed / "link").symlink_to(probe_dirs.target)  # dangling until the target is made
    return probe_dirs


# (name, spec, how the target is made, expected code); `{t}` is the target, `{a}` the allowed directory.
PROBES = [
    ("outside file", "ViT-B-32:{t}", "file", "weights_not_allowed"),
    ("real large architecture, forbidden path", "ViT-L-14:{t}", "file", "weights_not_allowed"),
    ("symlink in the allowed dir pointing out", "ViT-B-32:{a}/link", "file", "weights_not_allowed"),
    ("dot-dot out of the allowed dir", "ViT-B-32:{a}/../outside/weights.safetensors", "file", "weights_not_allowed"),
    ("tilde", "ViT-B-32:~/../../../../../../../..{t}", "file", "weights_not_allowed"),
    ("file URL", "ViT-B-32:file://{t}", "file", "weights_not_allowed"),
    ("FIFO", "ViT-B-32:{t}", "fifo", "weights_not_allowed"),
    ("directory", "ViT-B-32:{t}", "dir", "weights_not_allowed"),
    ("huge architecture name", "X" * 5000 + ":{t}", "file", "unknown_base_model"),
    ("long architecture name", "X" * 300 + ":{t}", "file", "unknown_base_model"),
    ("architecture not served", "ViT-bigG-14:{t}", "file", "base_model_not_allowed"),
    ("open_clip local-dir schema", "local-dir:{t}", "dir", "base_model_not_allowed"),
    ("relative name in the working directory", "ViT-B-32:weights.safetensors", "file", "weights_unavailable"),
]


def _spec(template: str, probe_dirs: ProbeDirs) -> str:
    return template.replace("{t}", str(probe_dirs.target)).replace("{a}", str(probe_dirs.allowed))


def _make(probe_dirs: ProbeDirs, how: str) -> None:
    {"file": probe_dirs.make_file, "fifo": probe_dirs.make_fifo, "dir": probe_dirs.make_dir}[how]()


def _settings(probe_dirs: ProbeDirs, **overrides: object) -> Settings:
    return Settings(data_dir=probe_dirs.root / "var", local_weights_dirs=[probe_dirs.allowed], **overrides)  # type: ignore[arg-type]


def _bounded(work: Callable[[], None], fifo: Path, seconds: float = 120.0) -> None:
    """Run work in a thread; if it hangs (something opened the FIFO for reading), unblock it and fail."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer releases the blocked reader
        pytest.fail(f"a probe hung: {fifo} was opened")
    if errors:
        raise errors[0]


# ---- the policy itself -------------------------------------------------------------------------


def test_refused_specs_answer_the_same_whether_or_not_the_target_exists(
    probe_dirs: ProbeDirs, nothing_is_built: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(probe_dirs)
    monkeypatch.chdir(probe_dirs.outside)

    def probe_all() -> None:
        for name, template, how, code in PROBES:
            spec = _spec(template, probe_dirs)
            answers = []
            for present in (True, False):
                if present:
                    _make(probe_dirs, how)
                with pytest.raises(InputError) as caught:
                    check_base_model_spec(spec, settings)
                answers.append((caught.value.code, caught.value.message, caught.value.param))
                probe_dirs.remove()
            assert answers[0] == answers[1], f"{name}: the answer reveals whether {probe_dirs.target} exists"
            assert answers[0][0] == code and answers[0][2] == "base_model", (name, answers[0])
            assert str(probe_dirs.outside) not in answers[0][1], f"{name}: the message quotes the path"

    _bounded(probe_all, probe_dirs.target)
    assert nothing_is_built == []


def test_the_issues_probes_get_one_code_and_one_message(nothing_is_built: list[str], tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    answers = set()
    for spec in ("ViT-B-32:/etc/passwd", "ViT-B-32:/etc/shadow-nonexistent", "ViT-B-32:/proc/self/environ",
                 "ViT-L-14:/etc/passwd", "ViT-B-16:/proc/self/environ-nonexistent"):
        with pytest.raises(InputError) as caught:
            check_base_model_spec(spec, settings)
        answers.add((caught.value.code, caught.value.message))
    assert len(answers) == 1 and next(iter(answers))[0] == "weights_not_allowed", answers
    assert nothing_is_built == []


def test_files_in_an_allowed_directory_are_accepted_by_their_real_path(probe_dirs: ProbeDirs) -> None:
    settings = _settings(probe_dirs)
    weights = probe_dirs.allowed / "sub" / "weights.safetensors"
    weights.parent.mkdir()
    shutil.copy(PROXY / "open_clip_model.safetensors", weights)
    (probe_dirs.allowed / "inside-link").symlink_to(weights)
    for spec in (f"ViT-B-32:{weights}", f"ViT-B-32:{probe_dirs.allowed}/sub/../sub/weights.safetensors",
                 f"ViT-B-32:{probe_dirs.allowed}/inside-link"):
        assert check_base_model_spec(spec, settings) == f"ViT-B-32:{os.path.realpath(weights)}"
    # A directory listed through a symlink still matches (both sides are resolved).
    alias = probe_dirs.root / "alias"
    alias.symlink_to(probe_dirs.allowed)
    aliased = Settings(data_dir=probe_dirs.root / "var", local_weights_dirs=[alias])
    assert check_base_model_spec(f"ViT-B-32:{weights}", aliased) == f"ViT-B-32:{os.path.realpath(weights)}"
    # A sibling whose name starts with the allowed directory's is not inside it.
    sibling = probe_dirs.root / "allowed-not"
    sibling.mkdir()
    shutil.copy(weights, sibling / "w.safetensors")
    with pytest.raises(InputError) as caught:
        check_base_model_spec(f"ViT-B-32:{sibling}/w.safetensors", settings)
    assert caught.value.code == "weights_not_allowed"


def test_non_files_inside_an_allowed_directory_are_refused_without_opening_them(
    probe_dirs: ProbeDirs, nothing_is_built: list[str]
) -> None:
    settings = _settings(probe_dirs)
    fifo = probe_dirs.allowed / "fifo.safetensors"
    os.mkfifo(fifo)
    (probe_dirs.allowed / "folder.safetensors").mkdir()
    results: dict[str, str] = {}

    def probe() -> None:
        for name in ("fifo.safetensors", "folder.safetensors", "missing.safetensors"):
            with pytest.raises(InputError) as caught:
                check_base_model_spec(f"ViT-B-32:{probe_dirs.allowed / name}", settings)
            results[name] = caught.value.code

    _bounded(probe, fifo)
    assert set(results.values()) == {"weights_unavailable"}, results
    assert nothing_is_built == []


def test_tags_shipped_models_and_object_store_weights_keep_working(tmp_path: Path, source_bucket: str) -> None:
    settings = Settings(data_dir=tmp_path / "var", source_buckets=[source_bucket])
    assert check_base_model_spec(" proxy-cifar10-tiny ", settings) == "proxy-cifar10-tiny"
    assert check_base_model_spec("ViT-B-16:openai", settings) == "ViT-B-16:openai"
    uri = f"ViT-B-16:s3://{source_bucket}/weights/b16.safetensors"
    assert check_base_model_spec(uri, settings) == uri
    assert check_base_model_spec("ViT-B-16:openai\n", settings) == "ViT-B-16:openai"
    for spec, code in (
        ("ViT-B-16:no-such-tag", "weights_unavailable"),
        ("ViT-B-16:s3://another-bucket/w.safetensors", "weights_unavailable"),
        ("hf-hub:laion/CLIP-ViT-B-32", "base_model_not_allowed"),
        ("no-such-model", "unknown_base_model"),
        ("ViT-B-16:\x00/etc/passwd", "unknown_base_model"),
    ):
        with pytest.raises(InputError) as caught:
            check_base_model_spec(spec, settings)
        assert caught.value.code == code, (spec, caught.value.message)
    only_b16 = Settings(data_dir=tmp_path / "var", base_model_architectures=["ViT-B-16"])
    with pytest.raises(InputError) as caught:
        check_base_model_spec("proxy-cifar10-tiny", only_b16)
    assert caught.value.code == "base_model_not_allowed"


# ---- through the API ---------------------------------------------------------------------------


@pytest.fixture
def probing_client(make_client, probe_dirs: ProbeDirs) -> Iterator[TestClient]:
    with make_client(
        local_weights_dirs=[probe_dirs.allowed], classify_requests_per_second=1000.0, classify_burst=1000
    ) as client:
        yield client


def test_api_probes_are_refused_alike_open_nothing_and_cost_no_memory(
    probing_client: TestClient,
    team,
    probe_dirs: ProbeDirs,
    nothing_is_built: list[str],
    dtd_images,
    monkeypatch: pytest.MonkeyPatch,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    monkeypatch.chdir(probe_dirs.outside)
    image = base64.b64encode(_png()).decode()
    archive = dtd_images.zip(dtd_images.paths(8))

    def ask(spec: str) -> list[tuple[int, dict]]:
        zero_shot = probing_client.post(
            "/classify", headers=team.headers, json={"images": [image], "class_names": NAMES, "base_model": spec}
        )
        adaptation = probing_client.post(
            "/adaptations",
            headers=team.headers,
            data={"class_names": json.dumps(NAMES), "base_model": spec},
            files={"images": ("images.zip", archive, "application/zip")},
        )
        return [(response.status_code, response.json()["error"]) for response in (zero_shot, adaptation)]

    ask("ViT-B-32:/etc/passwd")  # warm up the request path before measuring memory
    before = _rss_bytes()

    def probe_all() -> None:
        for name, template, how, code in [*PROBES, ("the issue's probe", "ViT-B-32:/proc/self/environ", "file", None)]:
            spec = _spec(template, probe_dirs)
            _make(probe_dirs, how)
            present = ask(spec)
            probe_dirs.remove()
            absent = ask(spec)
            assert present == absent, f"{name}: the answer reveals whether the target exists"
            for status, error in present:
                assert status == 400 and error["param"] == "base_model", (name, error)
                assert error["code"] == (code or "weights_not_allowed"), (name, error)

    _bounded(probe_all, probe_dirs.target, seconds=300)
    grown = _rss_bytes() - before
    assert nothing_is_built == []
    assert grown < 100 * 1024 * 1024, f"the API grew by {grown / 2**20:.0f} MiB on refused probes"
    with session_factory() as session:
        rows = session.scalar(select(func.count()).select_from(Adaptation).where(Adaptation.team_id == team.id))
    assert rows == 0 and store.list(f"teams/{team.id}/") == [], "a refused request wrote something"



def test_allowed_local_weights_serve_and_load_errors_hide_library_text(
    make_client, team, probe_dirs: ProbeDirs, proxy_arch: str, dtd_images
) -> None:
    weights = probe_dirs.allowed / "proxy.safetensors"
    shutil.copy(PROXY / "open_clip_model.safetensors", weights)
    broken = probe_dirs.allowed / "broken.safetensors"
    broken.write_bytes(b"this is not a safetensors file")
    images = [base64.b64encode(path.read_bytes()).decode() for path in dtd_images.paths(2)]

    def classify(client: TestClient, spec: str, **headers: str):
        body = {"images": images, "class_names": NAMES, "base_model": spec, "top_k": 2}
        return client.post("/classify", headers={**team.headers, **headers}, json=body)

    architectures = [*DEFAULT_BASE_MODEL_ARCHITECTURES, proxy_arch]
    with make_client(local_weights_dirs=[probe_dirs.allowed], base_model_architectures=architectures) as client:
        local = classify(client, f"{proxy_arch}:{weights}")
        shipped = classify(client, "proxy-cifar10-tiny")
        assert local.status_code == 200 and shipped.status_code == 200, local.text
        for ours, reference in zip(local.json()["results"], shipped.json()["results"], strict=True):
            assert [p["label"] for p in ours["predictions"]] == [p["label"] for p in reference["predictions"]]
            for p, q in zip(ours["predictions"], reference["predictions"], strict=True):
                assert p["score"] == pytest.approx(q["score"], abs=1e-5)

        failed = classify(client, f"{proxy_arch}:{broken}", **{"X-Request-ID": "probe-123"})
        assert failed.status_code == 400 and failed.headers["x-request-id"] == "probe-123"
        assert failed.json()["error"] == {
            "code": "weights_unavailable",
            "message": "the weights of this base model could not be loaded (request id probe-123)",
            "param": "base_model",
        }

        truncated = _png()[:60]
        corrupt = client.post(
            "/classify",
            headers={**team.headers, "X-Request-ID": "not a well-formed id!"},
            json={"images": [base64.b64encode(truncated).decode()], "class_names": NAMES},
        )
        request_id = corrupt.headers["x-request-id"]
        assert request_id != "not a well-formed id!" and len(request_id) == 32
        assert corrupt.status_code == 400 and corrupt.json()["error"] == {
            "code": "corrupt_image",
            "message": f"corrupt or truncated image (request id {request_id})",
            "param": "images.0",
        }
