"""The alert rules under Debian's promtool: `check rules` accepts them, `test rules` fires and
resolves every alert, and those tests catch an alert that never fires or never resolves."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kvops.observability import alerts as alert_rules
from kvops.observability.dashboards import CHART_FILES

pytestmark = pytest.mark.slow

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool comes with Debian's prometheus package (make host-deps)"
)


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_rules_check_and_every_alert_fires_and_resolves():
    checked = promtool("check", "rules", "alerts.yaml", cwd=CHART_FILES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules.alerts())} rules found" in checked.stdout
    tested = promtool("test", "rules", "alerts-tests.yaml", cwd=CHART_FILES)
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
@pytest.mark.parametrize("alert", [a.name for a in alert_rules.alerts()])
@pytest.mark.parametrize(("broken", "threshold"), [("never fires", 1e9), ("never resolves", -1)])
def test_the_rule_tests_catch_a_broken_threshold(alert, broken, threshold, tmp_path):
    rules = yaml.safe_load((CHART_FILES / "alerts.yaml").read_text())
    (rule,) = [r for r in rules["groups"][0]["rules"] if r["alert"] == alert]
    (definition,) = [a for a in alert_rules.alerts() if a.name == alert]
    assert definition.op == ">"
    rule["expr"] = f"{definition.query} > {threshold:g}"
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rules))
    shutil.copy(CHART_FILES / "alerts-tests.yaml", tmp_path)
    tested = promtool("test", "rules", "alerts-tests.yaml", cwd=tmp_path)
    assert tested.returncode != 0, f"{alert} {broken}, yet promtool's tests pass"
    assert alert in tested.stdout + tested.stderr
