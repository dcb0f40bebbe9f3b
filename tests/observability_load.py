"""A short, bounded load on a real `kvops serve` that gives every worker series of the dashboards
and alerts a value, and the check that each of their queries returns data from Prometheus.
Shared by tests/test_observability_live.py and e2e/test_observability_cluster.py."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from prometheus_process import PrometheusProcess, finite_values

from kvops.observability import alerts as alert_rules
from kvops.observability import dashboards as generator
from kvops.observability.render_png import prometheus_range, render

SYSTEM = "You are a helpful assistant. Answer in one short sentence."
QUESTIONS = ["What colour is the sky?", "Name a fruit.", "What is two plus two?"]
SCRAPES_APART_S = 1.5  # Prometheus scrapes every second (prometheus_process.py)


@dataclass
class Load:
    model: str
    requests: int
    answer_ids: dict[str, str]  # prompt version -> id of an answer it produced


def run_load(server, prompt: str, versions: tuple[str, ...]) -> Load:
    """About 20 requests of at most 8 tokens: plain and streamed chats, each prompt version
    twice, deadlines no request can meet (with and without a prompt) at the start and at the end
    (rate() sees a new series only from its second sample), and an unknown model."""
    client = openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60
    )
    model = client.models.list().data[0].id
    sent = 0

    def time_out(reference: dict | None) -> None:
        nonlocal sent
        try:
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=8,
                extra_body={"prompt": reference} if reference else None,
                extra_headers={"x-request-timeout": "0.001"},
            )
        except openai.APIStatusError as error:
            assert error.status_code == 504, error
        else:
            raise AssertionError("a 1 ms deadline was met")
        sent += 1

    def references() -> list[dict]:
        return [{"name": prompt, "version": v, "variables": {"question": "Hi?"}} for v in versions]

    for reference in [None, *references()]:
        time_out(reference)
    for streamed in (False, True):
        for question in QUESTIONS:
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
            ]
            if streamed:  # TTFT and per-token timing as streaming clients see them
                chunks = client.chat.completions.create(
                    model=model, messages=messages, max_tokens=8, stream=True
                )
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                client.chat.completions.create(model=model, messages=messages, max_tokens=8)
            sent += 1
    answer_ids = {}
    for round_ in range(2):
        if round_:  # the first round's answers made the series; a scrape later they grow
            time.sleep(SCRAPES_APART_S)
        for version in versions:
            question = QUESTIONS[round_]
            reference = {"name": prompt, "version": version, "variables": {"question": question}}
            answer = client.chat.completions.create(
                model=model, messages=[], max_tokens=8, extra_body={"prompt": reference}
            )
            answer_ids[version] = answer.id
            sent += 1
    try:
        client.chat.completions.create(model="no-such-model", messages=[], max_tokens=4)
    except openai.NotFoundError:
        sent += 1
    for reference in [None, *references()]:
        time_out(reference)
    return Load(model, sent, answer_ids)


def give_feedback(server, answer_ids: dict[str, str]) -> None:
    for number, request_id in enumerate(answer_ids.values()):
        response = httpx.post(
            f"{server.base_url}/v1/feedback",
            json={"request_id": request_id, "score": "up" if number % 2 == 0 else 7},
            timeout=10,
        )
        assert response.status_code == 200, response.text


def load_and_scrape(server, prometheus: PrometheusProcess, selector: str, prompt, versions):
    """Run the load, rate answers twice a few scrapes apart (the first rating creates the
    feedback series, which rate() cannot see alone), and wait until Prometheus has it all."""
    load = run_load(server, prompt, versions)
    prometheus.wait_for(f"sum(kvops_requests_total{{{selector}}}) >= {load.requests}")
    give_feedback(server, load.answer_ids)
    prometheus.wait_for(f"sum(kvops_feedback_total{{{selector}}}) >= {len(versions)}")
    time.sleep(SCRAPES_APART_S)
    give_feedback(server, load.answer_ids)
    prometheus.wait_for(f"sum(kvops_feedback_total{{{selector}}}) >= {2 * len(versions)}")
    return load


def queries(variables: dict[str, str], operator: bool, worker: bool) -> list[tuple[str, str]]:
    """(where, expression) of every dashboard panel, variable and alert over the chosen side's
    series, the template variables substituted."""
    chosen = []
    for name, dashboard in generator.dashboards().items():
        for title, expr in generator.dashboard_queries(dashboard):
            chosen.append((f"{name}: {title}", generator.substitute(expr, variables)))
    chosen += [(f"alert {alert.name}", alert.query) for alert in alert_rules.alerts()]
    return [
        (where, expr)
        for where, expr in chosen
        if (operator if "kvops_operator_" in expr else worker)
    ]


def without_data(prometheus: PrometheusProcess, chosen: list[tuple[str, str]]) -> list[str]:
    return [f"{where}: {e}" for where, e in chosen if not finite_values(prometheus.query(e))]


def draw(
    prometheus: PrometheusProcess,
    names: list[str],
    variables: dict[str, str],
    start: float,
    folders: list[Path],
    skip_operator: bool = False,
) -> None:
    """Draw the dashboards into each folder; every panel must have drawn a series."""
    end = time.time()
    fetch = prometheus_range(prometheus.url, start, end, 1)
    for name in names:
        dashboard = generator.dashboards()[name]
        for folder in folders:
            path = folder / name.replace(".json", ".png")
            drawn = render(
                dashboard, fetch, {**variables, "__rate_interval": "15s"}, path, (start, end)
            )
            assert path.stat().st_size > 20_000
            blank = [
                panel.title
                for panel in dashboard.panels
                if drawn[panel.title] == 0
                and not (skip_operator and any("kvops_operator_" in q.expr for q in panel.queries))
            ]
            assert not blank, f"{name}: panels drawn without data: {blank}"
