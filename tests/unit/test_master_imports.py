"""The gunicorn master loads no app code but settings and the embedded-Redis helper, so the
workers it forks after a HUP import the code on disk (issue 15). Checked on the config file
as gunicorn runs it, in a fresh interpreter, and on the package's own import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

#: Anything here in the master would be inherited by every worker, whatever is on disk.
FORBIDDEN = ("flask", "werkzeug", "PIL", "pillow_avif", "requests", "redis", "redis_lock", "prometheus_client",
             "app.factory", "app.cache", "app.fetch", "app.render", "app.image", "app.metrics", "app.observe")


def _modules_after(code: str) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGE_PROXY_", "PROMETHEUS_"))}
    env["IMAGE_PROXY_REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing is started or contacted
    result = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def _loaded(modules: set[str], name: str) -> bool:
    return name in modules or any(module.startswith(name + ".") for module in modules)


def test_gunicorn_conf_loads_no_flask_pillow_requests_redis_or_app_factory():
    # gunicorn executes the config file by path (util.load_config_from_filename), as here.
    modules = _modules_after(
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('gunicorn_conf', 'gunicorn.conf.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))"
    )
    assert {"app.settings", "app.embedded_redis"} <= modules, "the check really ran the config"
    assert [name for name in FORBIDDEN if _loaded(modules, name)] == []


def test_importing_the_app_package_or_settings_loads_no_flask():
    modules = _modules_after("import app, app.settings, app.embedded_redis, app.log_format, app.client_address")
    assert [name for name in FORBIDDEN if _loaded(modules, name)] == []


def test_from_app_import_create_app_still_works_for_old_callers():
    modules = _modules_after("from app import create_app; assert callable(create_app)")
    assert "flask" in modules and "app.factory" in modules
