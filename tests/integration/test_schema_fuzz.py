"""Schemathesis over the whole OpenAPI schema of the served providers app: generated requests (valid and invalid)
to every operation, each answer checked against what the schema documents for it.

Bounded: EXAMPLES generated cases per operation and generation mode, no deadline, no shrinking, a fixed seed
(SAM3_FUZZ_SEED to vary it). `/api/events` is excluded: it streams until the client leaves. Runs twice: with a
valid key (so every route is exercised past the gate), and smaller without one (every keyed route's 401).

A generated string is never a decodable image, so about half of the valid cases of the synchronous image routes
carry a real one (everything else in them still generated): those reach the model and answer 200s whose bodies
are checked too. Video and queued routes keep their generated media: a real one starts session actors or jobs
that outlive the case.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import API_KEY, png_b64, random_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHECKS = (not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance)
EXAMPLES = 20  # per operation and generation mode
ENDLESS = {"GET /api/events"}  # Server-Sent Events: the stream never ends by itself
SEED = int(os.environ.get("SAM3_FUZZ_SEED", "0"))
KEY_HEADERS = {"authorization": f"Bearer {API_KEY}", "x-api-key": API_KEY}
PNG = png_b64(random_image(7))  # 128 x 96
AUTO_POINTS_PER_SIDE = 8  # Segmind's automatic masks with a real image: 64 clicks, not up to 16,384 (time, not limits)


def _image_field(body: dict, key: str, value: object) -> None:
    if isinstance(body, dict) and key in body:
        body[key] = value


def _segmind(body: dict) -> None:
    _image_field(body, "image", PNG)
    if isinstance(body.get("points_per_side"), int) and body["points_per_side"] > AUTO_POINTS_PER_SIDE:
        body["points_per_side"] = AUTO_POINTS_PER_SIDE


def _oxen(body: dict) -> None:
    _image_field(body, "input_image", f"data:image/png;base64,{PNG}")
    _image_field(body, "model", "sam-3-image")


def _space(body: dict) -> None:
    _image_field(body.get("inputs"), "image", PNG)


def _predict(body: dict) -> None:
    if isinstance(body.get("data"), list) and body["data"]:
        body["data"][0] = PNG


# operation -> how a generated valid body gets a real image in place of its generated one
REAL_IMAGE = {
    "POST /v1/image/segment": lambda body: _image_field(body, "image", PNG),
    "POST /api/ai/images/edit": _oxen,
    "POST /v1/sam3-image": _segmind,
    "POST /sam3/concept_segment": lambda body: _image_field(body, "image", {"type": "base64", "value": PNG}),
    "POST /sam3/visual_segment": lambda body: _image_field(body, "image", {"type": "base64", "value": PNG}),
    "POST /sam3/embed_image": lambda body: _image_field(body, "image", {"type": "base64", "value": PNG}),
    "POST /api/sam2_compatible": _space,
    "POST /api/predict": _predict,
}


@dataclass
class Report:
    """What one run sent and what the checks found."""

    operations: int = 0
    cases: int = 0
    real_images: int = 0  # cases that carried a real image
    unsatisfiable: list[str] = field(default_factory=list)  # (operation, mode) with nothing to generate
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: dict[str, list[str]] = field(default_factory=lambda: {check.__name__: [] for check in CHECKS})

    def summary(self, title: str, seconds: float) -> str:
        head = f"{title}: {self.operations} operations, {self.cases} cases ({self.real_images} with a real image)"
        lines = [f"{head}, {seconds:.1f} s (seed {SEED})"]
        if self.unsatisfiable:
            lines.append(f"  nothing to generate for: {', '.join(self.unsatisfiable)}")
        lines += [f"  {name}: {len(found)} failures" for name, found in self.failures.items()]
        lines += [f"  {label}: {dict(sorted(counts.items()))}" for label, counts in sorted(self.statuses.items())]
        return "\n".join(lines)

    def problems(self) -> list[str]:
        return [f"[{name}] {text}" for name, found in self.failures.items() for text in found]


def fuzz(base_url: str, headers: dict[str, str], modes: tuple[GenerationMode, ...], examples: int) -> Report:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=60)
    schema.config.output.sanitization.enabled = False  # reproducers carry the test key, which is no secret
    report = Report()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label in ENDLESS:
            continue
        report.operations += 1
        declared = {p.name.lower() for p in operation.headers}
        fixed = {name: value for name, value in headers.items() if name in declared}  # generated values replaced
        for mode in modes:
            case_test = CaseTest(report, session, base_url, headers, operation.label, mode)
            strategy = operation.as_strategy(generation_mode=mode, headers=fixed or None)
            try:
                hypothesis_test(case_test, strategy, examples)()
            except Unsatisfiable:  # e.g. no negative case for an operation without parameters or body
                report.unsatisfiable.append(f"{operation.label} ({mode.value})")
    return report


def hypothesis_test(case_test: CaseTest, strategy, examples: int):
    @seed(SEED)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],  # no shrinking
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=strategy, real=st.booleans())
    def run(case, real: bool) -> None:
        case_test(case, real)

    return run


@dataclass
class CaseTest:
    """One operation in one generation mode: send each case, run every check on the answer, record failures."""

    report: Report
    session: requests.Session
    base_url: str
    headers: dict[str, str]
    label: str
    mode: GenerationMode

    def __call__(self, case, real: bool) -> None:
        if real and self.mode == GenerationMode.POSITIVE and self.label in REAL_IMAGE:
            REAL_IMAGE[self.label](case.body)
            self.report.real_images += 1
        response = case.call(base_url=self.base_url, session=self.session, headers=self.headers, timeout=120)
        self.report.cases += 1
        self.report.statuses[self.label][response.status_code] += 1
        for check in CHECKS:
            try:
                case.validate_response(response, checks=[check], headers=self.headers)
            except FailureGroup as group:
                titles = "; ".join(f"{f.title}: {str(f.message)[:200]}" for f in group.exceptions)
                curl = case.as_curl_command(headers=self.headers, base_url=self.base_url)
                self.report.failures[check.__name__].append(
                    f"{self.label} -> {response.status_code} ({self.mode.value}): {titles}\n    {curl[:600]}"
                )


def _run(base_url: str, title: str, headers: dict[str, str], modes, examples: int) -> None:
    started = time.perf_counter()
    report = fuzz(base_url, headers, modes, examples)
    print("\n" + report.summary(title, time.perf_counter() - started))
    assert report.operations >= 25, "the schema lost operations"
    assert not report.problems(), "\n".join(report.problems()[:40])


def test_schemathesis_with_a_key_finds_nothing(providers_url):
    _run(providers_url, "schemathesis with a key", KEY_HEADERS, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
         EXAMPLES)


def test_schemathesis_without_a_key_finds_nothing(providers_url):
    _run(providers_url, "schemathesis without a key", {}, (GenerationMode.POSITIVE,), 5)
