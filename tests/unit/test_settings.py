from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from app.settings import SETTINGS, Settings, SettingsError, markdown_table, unknown_variables

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_the_spec():
    s = Settings.from_env({})
    assert s.bind == "127.0.0.1:8000"
    assert s.upstream_timeout == 20
    assert s.cache_ttl == 24 * 3600
    assert s.max_source_bytes == 32 * 1024 * 1024
    assert s.max_source_pixels == 50_000_000
    assert s.max_width == 8192
    assert s.max_animation_frames == 300
    assert s.error_ttl == 10
    assert s.allowed_ports == (80, 443)
    assert s.redis_url is None


def test_table_defaults_equal_the_dataclass_defaults():
    defaults = Settings()
    for spec in SETTINGS:
        assert spec.parse(spec.default) == getattr(defaults, spec.attr), spec.env


def test_every_dataclass_field_has_a_table_row():
    assert {spec.attr for spec in SETTINGS} == set(Settings.__dataclass_fields__)


def test_values_are_parsed():
    s = Settings.from_env({
        "IMAGE_PROXY_ALLOWED_WIDTHS": "640, 320,1920",
        "IMAGE_PROXY_ALLOW_NETWORKS": "10.0.0.0/8,fd00::/8",
        "IMAGE_PROXY_ALLOWED_HOSTS": "Example.com,*.cdn.example.org.",
        "IMAGE_PROXY_INPUT_FORMATS": "jpeg,png",
        "IMAGE_PROXY_REDIS_URL": "redis://10.0.0.5:6379/0",
        "IMAGE_PROXY_REDIS_CLUSTER": "yes",
        "IMAGE_PROXY_UPSTREAM_TIMEOUT": "2.5",
    })
    assert s.allowed_widths == (320, 640, 1920)
    assert s.allow_networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert s.allowed_hosts == ("example.com", "*.cdn.example.org")
    assert s.input_formats == frozenset({"jpeg", "png"})
    assert s.redis_cluster is True
    assert s.upstream_timeout == 2.5


BAD = [
    ("IMAGE_PROXY_UPSTREAM_TIMEOUT", "soon"),
    ("IMAGE_PROXY_UPSTREAM_TIMEOUT", "-1"),
    ("IMAGE_PROXY_MAX_WIDTH", "0"),
    ("IMAGE_PROXY_MAX_WIDTH", "12px"),
    ("IMAGE_PROXY_CACHE_TTL", "1.5"),
    ("IMAGE_PROXY_ALLOWED_WIDTHS", "640,abc"),
    ("IMAGE_PROXY_ALLOW_NETWORKS", "10.0.0.0/33"),
    ("IMAGE_PROXY_ALLOWED_PORTS", "80,70000"),
    ("IMAGE_PROXY_ALLOWED_HOSTS", "http://example.com"),
    ("IMAGE_PROXY_INPUT_FORMATS", "jpeg,svg"),
    ("IMAGE_PROXY_REDIS_URL", "localhost:6379"),
    ("IMAGE_PROXY_REDIS_CLUSTER", "maybe"),
    ("IMAGE_PROXY_BIND", "8000"),
    ("IMAGE_PROXY_LOG_FORMAT", "xml"),
    ("IMAGE_PROXY_VIA_TOKEN", "two words"),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_value_is_refused_naming_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_every_bad_variable_is_reported_together():
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"IMAGE_PROXY_MAX_WIDTH": "x", "IMAGE_PROXY_CACHE_TTL": "y"})
    assert "IMAGE_PROXY_MAX_WIDTH" in str(caught.value) and "IMAGE_PROXY_CACHE_TTL" in str(caught.value)


def test_unknown_variables_are_named_for_a_warning():
    assert unknown_variables({"IMAGE_PROXY_REDIS_ULR": "x", "IMAGE_PROXY_BIND": "a:1", "HOME": "/"}) == [
        "IMAGE_PROXY_REDIS_ULR"
    ]


def test_configuration_page_settings_table_is_generated_from_the_table():
    page = (ROOT / "docs" / "configuration.md").read_text()
    block = re.search(r"<!-- settings:begin -->\n(.*?)\n<!-- settings:end -->", page, re.S)
    assert block, "docs/configuration.md must hold the generated settings table"
    assert block.group(1).strip() == markdown_table().strip(), "run: python -m app.settings --markdown"


def test_readme_settings_summary_names_real_settings_with_their_defaults():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- settings-summary:begin -->\n(.*?)\n<!-- settings-summary:end -->", readme, re.S)
    assert block, "README.md must hold the short settings table"
    defaults = {spec.env: spec.default for spec in SETTINGS}
    rows = re.findall(r"^\| `(IMAGE_PROXY_[A-Z_]+)` \| `([^`]*)` \|", block.group(1), re.M)
    assert len(rows) >= 8
    for name, default in rows:
        assert name in defaults, f"README names {name}, which app/settings.py does not read"
        assert default == defaults[name], f"README says {name} defaults to {default!r}, the code {defaults[name]!r}"
