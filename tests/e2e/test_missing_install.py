"""The suite's rule for a missing tool, model or server: skip with the reason
outside CI, fail under CI (CI=true), where every install step is mandatory."""

from __future__ import annotations

import pytest

from tests.conftest import missing_install, require_tool

ABSENT_TOOL = "whisperd-no-such-tool"


def test_outside_ci_a_missing_tool_skips_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{ABSENT_TOOL} is not installed .Debian package pkg"):
        require_tool(ABSENT_TOOL, "pkg")


def test_under_ci_a_missing_tool_fails_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{ABSENT_TOOL} is not installed.*mandatory under CI"):
        require_tool(ABSENT_TOOL, "pkg")
    with pytest.raises(pytest.fail.Exception, match="no model"):
        missing_install("no model")


def test_a_present_tool_is_found() -> None:
    assert require_tool("sh", "dash").endswith("/sh")
